"""`ConfigError`: a bad simulator setting (its own module so every settings module can raise it)."""


class ConfigError(ValueError):
    """A simulator setting is out of range or inconsistent; the message names the setting."""
