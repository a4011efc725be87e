from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.settings import load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def test_file_is_read(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "backends:\n  - url: http://127.0.0.1:8001/\nport: 9000\n"))
    assert settings.port == 9000
    assert [b.url for b in settings.backends] == ["http://127.0.0.1:8001"]  # trailing slash removed


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"backends\.0\.urll: unknown key"):
        load_settings(write(tmp_path, "backends:\n  - urll: http://x:1\n    url: http://x:1\n"))


def test_unknown_top_level_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model_refresh_intervall: unknown key"):
        load_settings(write(tmp_path, "backends: [{url: 'http://x:1'}]\nmodel_refresh_intervall: 3\n"))


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("backends: [{url: 'ftp://x'}]", "backends.0.url"),
        ("backends: [{url: 'http://x:1/v1'}]", "backends.0.url"),
        # the URL names the backend in metrics, logs and traces: a password there would be everywhere
        ("backends: [{url: 'http://svc:hunter2@x:1'}]", "must not hold credentials"),
        ("backends: [{url: 'http://x:1'}]\nport: 70000", "port"),
        ("backends: [{url: 'http://x:1'}]\ntimeouts: {idle: -1}", "timeouts.idle"),
        ("backends: [{url: 'http://x:1'}]\ndiscovery: consul", "discovery"),
        ("backends: []", "static discovery needs at least one"),
        # accepted once, then wrong at run time: every request timed out, a success retried, every scrape stale
        ("backends: [{url: 'http://x:1'}]\nadmission: {models: {m: 0}}", "admission.models.m"),
        ("backends: [{url: 'http://x:1'}]\nadmission: {models: {m: -3}}", "admission.models.m"),
        ("backends: [{url: 'http://x:1'}]\nretries: {on_status: [200]}", "retries.on_status.0"),
        ("backends: [{url: 'http://x:1'}]\nhealth: {eject_base: 30, eject_max: 5}", "eject_max (5) is shorter"),
        ("discovery: kubernetes\nkubernetes: {namespaces: ['']}", "kubernetes.namespaces.0"),
        ("backends: [{url: 'http://x:1'}]\nrouting: {scrape_interval: 2}", "scrape_interval (2 s)"),
        ("backends: [{url: 'http://x:1'}]\nadmission: {stale_after: 0.05}", "admission.stale_after (0.05 s)"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    assert key in str(info.value)


def test_api_key_env_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ConfigError, match="NO_SUCH_KEY_VAR"):
        load_settings(write(tmp_path, "backends: [{url: 'http://x:1', api_key_env: NO_SUCH_KEY_VAR}]"))
    monkeypatch.setenv("NO_SUCH_KEY_VAR", "sk-upstream")
    settings = load_settings(write(tmp_path, "backends: [{url: 'http://x:1', api_key_env: NO_SUCH_KEY_VAR}]"))
    assert settings.backends[0].api_key() == "sk-upstream"


@pytest.mark.parametrize("key", ["sk-1\r\nX-Injected: 1", "sk 1", "clé"])
@pytest.mark.parametrize(
    "where", ["backends: [{url: 'http://x:1', api_key_env: WORKER_KEY}]", "kubernetes: {api_key_env: WORKER_KEY}"]
)
def test_an_upstream_key_that_cannot_go_into_a_header_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, where: str
) -> None:
    monkeypatch.setenv("WORKER_KEY", key)
    with pytest.raises(ConfigError, match="WORKER_KEY must be printable ASCII"):
        load_settings(write(tmp_path, where))


def test_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHYARD_PORT", "9100")
    monkeypatch.setenv("SWITCHYARD_TIMEOUTS__IDLE", "7.5")
    settings = load_settings(write(tmp_path, "backends: [{url: 'http://x:1'}]\nport: 9000\n"))
    assert settings.port == 9100
    assert settings.timeouts.idle == 7.5


def test_env_alone_configures_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHYARD_BACKENDS", '[{"url": "http://10.0.0.1:8000"}]')
    assert load_settings(None).backends[0].url == "http://10.0.0.1:8000"


def test_bad_env_value_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHYARD_MAX_BODY_BYTES", "lots")
    with pytest.raises(ConfigError, match="max_body_bytes"):
        load_settings(None, backends=[{"url": "http://x:1"}])


@pytest.mark.parametrize("text", ["- a\n- b\n", "backends: [\n"])
def test_file_that_is_not_a_mapping(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="config file"):
        load_settings(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.yaml")


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"log_level: info # caf\xe9\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_settings(path)
    keys = tmp_path / "keys.yaml"
    keys.write_bytes(b"- {name: caf\xe9, key: sk-0123456789abcdef}\n")
    with pytest.raises(ConfigError, match="cannot read keys_file"):
        load_settings(None, backends=[{"url": "http://x:1"}], auth={"keys_file": str(keys)})
