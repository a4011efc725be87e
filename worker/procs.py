"""Child-process helpers shared by the worker launcher and the local stack: no orphans, clean stops."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import IO

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies, even if the parent was SIGKILLed."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def spawn(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    stdout: IO[bytes] | int | None = None,
    own_group: bool = True,
) -> subprocess.Popen[bytes]:
    """Start argv in its own process group (so a whole tree can be signalled) tied to our lifetime."""
    preexec: Callable[[], None] | None = _die_with_parent if sys.platform.startswith("linux") else None
    return subprocess.Popen(
        list(argv),
        env=dict(env) if env is not None else None,
        stdout=stdout,
        stderr=subprocess.STDOUT if stdout is not None else None,
        process_group=0 if own_group else None,
        preexec_fn=preexec,
    )


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send sig to proc's process group (proc leads it), ignoring a group that is already gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop(proc: subprocess.Popen[bytes], grace: float = 20.0) -> int:
    """SIGTERM the group, wait up to grace seconds, then SIGKILL whatever is left; returns the exit code."""
    if proc.poll() is None:
        signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            signal_group(proc, signal.SIGKILL)
            proc.wait()
    # Reap stragglers the leader left behind in its group (e.g. engine-core processes).
    signal_group(proc, signal.SIGKILL)
    return exit_code(proc.returncode)


def exit_code(returncode: int | None) -> int:
    """Popen's negative 'killed by signal N' as the shell's 128+N."""
    if returncode is None:
        return 1
    return 128 - returncode if returncode < 0 else returncode


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when GET url answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= int(resp.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def http_get(url: str, timeout: float = 2.0) -> bytes | None:
    """The body of GET url when it answers 2xx, else None."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body: bytes = resp.read()
            return body if 200 <= int(resp.status) < 300 else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    """Poll check until it is true or timeout seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def free_port_block(count: int, low: int = 20000, high: int = 32000) -> int:
    """A base port with count consecutive ports nobody listens on, below Linux's ephemeral range: ports the
    kernel hands out for bind(0) and outgoing connections (vLLM's internal sockets, other tests) stay clear."""
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(low, high - count)
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports in {low}-{high}")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
