"""What the gateway knows of its backends and the loops that keep it true: discovery, model polls,
engine-metric scrapes and health checks, all writing into one registry that the request path only reads."""
