"""GET /admin/fleet and `switchyard status` against a real gateway in front of simulators."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from gateway.errors import ConfigError
from gateway.settings import load_settings
from tests.servers import gateway, running_sims, sim, wait_until

ADMIN, CLIENT = "admin-secret-1", "client-key-1"


@pytest.fixture
def keys() -> Iterator[None]:
    os.environ["TEST_ADMIN_KEY"] = ADMIN
    os.environ["TEST_CLIENT_KEY"] = CLIENT
    yield
    del os.environ["TEST_ADMIN_KEY"], os.environ["TEST_CLIENT_KEY"]


def status(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.clients.status", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_without_an_admin_key_there_is_no_admin_endpoint() -> None:
    with running_sims(sim("m")) as (upstream,), gateway(upstream.url) as gw:
        answer = httpx.get(gw.url + "/admin/fleet")
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == "unknown_url"
        result = status("--gateway", gw.url, "--admin-key", "x")
        assert result.returncode == 1
        assert "no admin endpoint" in result.stderr


def test_status_with_a_gateway_that_is_no_url_says_so_in_one_line() -> None:
    result = status("--gateway", "notaurl")
    assert result.returncode == 1
    assert result.stderr.startswith("switchyard status: cannot read notaurl/admin/fleet")
    assert "Traceback" not in result.stderr


@pytest.mark.usefixtures("keys")
def test_the_fleet_view_needs_the_admin_key_not_an_api_key() -> None:
    auth = {"keys": [{"name": "team", "key_env": "TEST_CLIENT_KEY"}]}
    with (
        running_sims(sim("chat", "--lora", "chat-lora", count=2), sim("embed")) as (chats, embed),
        gateway(*chats.urls(), embed.url, auth=auth, admin={"key_env": "TEST_ADMIN_KEY"}) as gw,
    ):
        url = gw.url + "/admin/fleet"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": f"Bearer {CLIENT}"}).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).json()["error"]["code"] == "invalid_api_key"
        wait_until(lambda: all(b.engine is not None for b in gw.registry.backends), 10, what="scrapes")
        fleet = httpx.get(url, headers={"Authorization": f"Bearer {ADMIN}"}).json()
        assert [m["model"] for m in fleet["models"]] == ["chat", "chat-lora", "embed"]
        chat = next(m for m in fleet["models"] if m["model"] == "chat")
        assert chat["routable"] == 2
        assert sorted(b["url"] for b in chat["backends"]) == sorted(chats.urls())
        backend = chat["backends"][0]
        assert backend["healthy"]
        assert backend["live"]
        assert backend["routable"]
        assert backend["ejected_for_s"] is None
        assert backend["inflight"] == 0
        assert backend["engine"]["waiting"] == 0
        assert 0 <= backend["engine"]["scrape_age_s"] < 5
        assert backend["engine"]["block_size"] == 16
        assert backend["cache"]["state"] in ("unknown", "live", "rebuilding")
        assert "approximate_blocks" in backend["cache"]
        assert fleet["gateway"] == {"draining": False, "inflight": 0, "waiting": 0, "prefix_mode": "auto"}

        table = status("--gateway", gw.url, env={"SWITCHYARD_ADMIN_KEY": ADMIN})
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split() == ["MODEL", "BACKEND", "STATUS", "INFLIGHT", "QUEUE", "KV", "SCRAPE", "CACHE",
                                    "BLOCKS", "LAG"]  # fmt: skip
        chat_rows = [line.split() for line in lines[1:] if line.startswith("chat ")]
        assert len(chat_rows) == 2
        assert all(row[2] == "Ready" for row in chat_rows)

        embed.kill()
        wait_until(lambda: not gw.registry.candidates("embed"), 10, what="embed down")
        down = status("--gateway", gw.url, "--admin-key", ADMIN)
        embed_row = next(line.split() for line in down.stdout.splitlines() if line.startswith("embed "))
        assert embed_row[2] == "Down"
        as_json = status("--gateway", gw.url, "--admin-key", ADMIN, "-o", "json")
        assert '"prefix_mode": "auto"' in as_json.stdout
        refused = status("--gateway", gw.url, "--admin-key", CLIENT)
        assert refused.returncode == 1
        assert "refused the admin key" in refused.stderr


def test_an_unreachable_gateway_is_one_clear_line() -> None:
    result = status("--gateway", "http://127.0.0.1:9", "--admin-key", "x")
    assert result.returncode == 1
    assert result.stderr.startswith("switchyard status: cannot read http://127.0.0.1:9/admin/fleet")


@pytest.mark.usefixtures("keys")
def test_the_admin_key_must_differ_from_every_api_key() -> None:
    os.environ["TEST_ADMIN_KEY"] = CLIENT
    with pytest.raises(ConfigError, match="admin key must be a key of its own"):
        load_settings(
            None,
            backends=[{"url": "http://a:1"}],
            auth={"keys": [{"name": "team", "key_env": "TEST_CLIENT_KEY"}]},
            admin={"key_env": "TEST_ADMIN_KEY"},
        )
