"""`switchyard up`'s startup progress: the rich live table on a terminal, plain lines elsewhere.

The views are fed statuses directly here; test_stack_progress.py drives them from a real stack of processes.
"""

from __future__ import annotations

import io
import os
import re
import time

from rich.console import Console

from worker.startup_view import ChildStatus, PlainView, RichView, view_for

SPINNER_FRAMES = set("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏")
FAILED = "failed: exited with code 1 while compiling / warming up"


def _statuses(now: float) -> list[ChildStatus]:
    return [
        ChildStatus("chat", "loading weights", "starting", now - 12),
        ChildStatus("embed", "compiling / warming up", "starting", now - 12),
        ChildStatus("gateway", "waiting for the workers (0/4 models listed)", "starting", now - 10),
    ]


def test_the_rich_view_redraws_one_line_per_child_with_spinner_phase_and_elapsed_time() -> None:
    out = io.StringIO()
    now = time.monotonic()
    with RichView(Console(file=out, force_terminal=True, width=100)) as view:
        view.show(_statuses(now))
        time.sleep(0.5)  # the live display refreshes on its own: the spinners turn
        view.show(
            [
                ChildStatus("chat", "ready", "ready", now - 12, now + 33),
                ChildStatus("embed", FAILED, "failed", now - 12, now),
                ChildStatus("gateway", "waiting for the workers (3/4 models listed)", "starting", now - 10),
            ]
        )
    text = out.getvalue()
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert "\x1b[" in text  # a terminal: colours and cursor moves, redrawn in place
    assert len(SPINNER_FRAMES & set(plain)) >= 2, "the spinner did not turn"
    assert re.search(r"chat\s+1[23] s loading weights", plain)
    assert re.search(r"embed\s+1[23] s compiling / warming up", plain)
    assert re.search(r"✓ chat\s+45 s ready", plain)
    assert re.search(r"✗ embed\s+12 s failed: exited with code 1 while compiling / warming up", plain)
    assert "(3/4 models listed)" in plain


def test_the_plain_view_prints_a_line_per_phase_change_only() -> None:
    out = io.StringIO()
    now = time.monotonic()
    with PlainView(out) as view:
        view.show(_statuses(now))
        view.show(_statuses(now))  # nothing changed: nothing printed
        view.show([ChildStatus("chat", "ready", "ready", now - 45, now)])
    lines = out.getvalue().splitlines()
    assert lines == [
        "[  12 s] chat: loading weights",
        "[  12 s] embed: compiling / warming up",
        "[  10 s] gateway: waiting for the workers (0/4 models listed)",
        "[  45 s] chat: ready",
    ]


def test_a_terminal_gets_the_rich_view_and_a_pipe_the_plain_one() -> None:
    leader, follower = os.openpty()
    read, write = os.pipe()
    with os.fdopen(follower, "w") as tty, os.fdopen(write, "w") as pipe:
        assert isinstance(view_for(tty), RichView)
        assert isinstance(view_for(pipe), PlainView)
    os.close(leader)
    os.close(read)
