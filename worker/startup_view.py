"""What `switchyard up` shows while its children start: one line per child with its phase and elapsed time.

On a terminal a rich live table redraws in place (a spinner per child, a tick when ready, a cross when it
failed); anywhere else (CI, a pipe, a file) one plain line is printed per phase change, so a log stays short.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Literal, Protocol

from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

State = Literal["starting", "ready", "failed"]


@dataclass(frozen=True)
class ChildStatus:
    """One child as the view shows it; times are time.monotonic() readings."""

    name: str
    phase: str
    state: State
    started: float
    ended: float | None = None

    def elapsed(self, now: float) -> float:
        return (self.ended if self.ended is not None else now) - self.started


class StartupView(Protocol):
    def __enter__(self) -> StartupView: ...

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def show(self, statuses: Sequence[ChildStatus]) -> None: ...


class PlainView:
    """One line per phase change: `[  45 s] chat: ready`."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._last: dict[str, tuple[str, State]] = {}

    def __enter__(self) -> PlainView:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._out.flush()

    def show(self, statuses: Sequence[ChildStatus]) -> None:
        now = time.monotonic()
        for status in statuses:
            if self._last.get(status.name) == (status.phase, status.state):
                continue
            self._last[status.name] = (status.phase, status.state)
            self._out.write(f"[{status.elapsed(now):4.0f} s] {status.name}: {status.phase}\n")
        self._out.flush()


class _Table:
    """The live renderable: rebuilt at every refresh, so spinners turn and elapsed times count."""

    def __init__(self) -> None:
        self.statuses: Sequence[ChildStatus] = ()
        self._spinners: dict[str, Spinner] = {}

    def __rich__(self) -> Table:
        now = time.monotonic()
        table = Table.grid(padding=(0, 1))
        width = max((len(s.name) for s in self.statuses), default=0)
        for status in self.statuses:
            mark: Spinner | Text
            if status.state == "ready":
                mark = Text("✓", style="bold green")
            elif status.state == "failed":
                mark = Text("✗", style="bold red")
            else:
                mark = self._spinners.setdefault(status.name, Spinner("dots", style="cyan"))
            phase_style = {"ready": "green", "failed": "bold red", "starting": ""}[status.state]
            table.add_row(
                mark,
                Text(status.name.ljust(width), style="bold"),
                Text(f"{status.elapsed(now):5.0f} s", style="dim"),
                Text(status.phase, style=phase_style),
            )
        return table


class RichView:
    """A live table on a terminal console, left on screen (last state) when the view closes."""

    def __init__(self, console: Console) -> None:
        self._table = _Table()
        self._live = Live(self._table, console=console, refresh_per_second=8, transient=False)

    def __enter__(self) -> RichView:
        self._live.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._live.refresh()
        self._live.stop()

    def show(self, statuses: Sequence[ChildStatus]) -> None:
        self._table.statuses = tuple(statuses)
        self._live.refresh()


def view_for(out: IO[str]) -> StartupView:
    """Rich on a terminal, plain lines otherwise."""
    if out.isatty():
        return RichView(Console(file=out))
    return PlainView(out)
