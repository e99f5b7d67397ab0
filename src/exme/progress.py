"""Progress for long work: rich bars with an ETA on a terminal, plain lines everywhere else.

Why two renderings: a rich live display only redraws a terminal. When output goes to a file or a
pipe (CI, ``nohup``, ``| tee``) rich prints nothing until the display stops, so an hour-long stage
looks hung. There, each finished unit (an evaluation, a checkpoint) is one plain line instead, or
one line every ``min_interval`` seconds for fast units (items of a task).

Usage::

    with Progress() as progress:               # enabled=False: every call is a no-op
        bar = progress.bar("alpha checkpoint-120", total=11)
        for point in points:
            ...
            bar.advance(info="best 0.4310")      # info: a short text shown after the counts
        bar.close()                              # optional: a finished bar stays on screen

While a display is live, SIGTERM raises :class:`Terminated` (a ``SystemExit`` with code 143), so
``finally`` blocks run and leaving the ``with`` block stops the display and shows the cursor again.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import TracebackType
from typing import IO, Any

__all__ = ["Bar", "Progress", "Terminated", "format_seconds", "install_sigterm_exit", "is_terminal", "restore_sigterm"]


class Terminated(SystemExit):
    """SIGTERM turned into an exception (exit code 143 = 128 + SIGTERM), so clean-up code runs."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def is_terminal(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (default stderr) is an interactive terminal that can redraw bars."""
    stream = stream if stream is not None else sys.stderr
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def format_seconds(seconds: float | None) -> str:
    """``h:mm:ss`` (or ``m:ss``); ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Bar:
    """One bar of a :class:`Progress`: ``advance`` after each finished unit."""

    def __init__(self, owner: "Progress", label: str, total: int | None, min_interval: float):
        self.owner = owner
        self.label = label
        self.total = total
        self.completed = 0
        self.info = ""
        self.min_interval = min_interval
        self.started = time.monotonic()
        self._last_line = -float("inf")
        self._printed = 0  # units counted in the last plain line
        self._task_id = None
        self._closed = False
        if owner._rich is not None:
            self._task_id = owner._rich.add_task(label, total=total, info="")

    # ------------------------------------------------------------------ updates
    def advance(self, n: int = 1, *, info: str | None = None) -> None:
        """``n`` more units done; ``info`` replaces the short text shown after the counts."""
        self.completed += n
        if info is not None:
            self.info = info
        if self.owner._rich is not None:
            self.owner._rich.update(self._task_id, advance=n, info=self.info)
        elif self.owner._plain:
            now = time.monotonic()
            done = self.total is not None and self.completed >= self.total
            if done or now - self._last_line >= self.min_interval:
                self._last_line = now
                self._printed = self.completed
                self.owner._write(self.line())

    def set_info(self, info: str) -> None:
        """Change the short text without counting a unit."""
        self.info = info
        if self.owner._rich is not None:
            self.owner._rich.update(self._task_id, info=info)

    def close(self) -> None:
        """Finish the bar: its last line is printed (plain mode) if the last advance did not print it."""
        if self._closed:
            return
        self._closed = True
        if self.owner._plain and self.completed != self._printed:
            self._printed = self.completed
            self.owner._write(self.line())

    # ------------------------------------------------------------------ text
    def eta(self) -> float | None:
        """Seconds left at the mean pace so far (``None`` before the first unit or without a total)."""
        if self.total is None or not self.completed:
            return None
        elapsed = time.monotonic() - self.started
        return elapsed / self.completed * max(0, self.total - self.completed)

    def line(self) -> str:
        """The plain-text form: ``label  3/11  elapsed 0:42  eta 1:52  info``."""
        count = f"{self.completed}/{self.total}" if self.total is not None else str(self.completed)
        parts = [self.label, count, f"elapsed {format_seconds(time.monotonic() - self.started)}"]
        if self.total is not None and self.completed < self.total:
            parts.append(f"eta {format_seconds(self.eta())}")
        if self.info:
            parts.append(self.info)
        return "  ".join(parts)


class Progress:
    """A group of bars drawn together; a context manager.

    ``enabled=False`` draws nothing. ``terminal`` forces (``True``) or forbids (``False``) the rich
    rendering; by default it follows whether ``stream`` (stderr) is a terminal. ``transient``
    removes the bars when the display stops (rich rendering only).
    """

    def __init__(
        self,
        enabled: bool = True,
        *,
        stream: IO[str] | None = None,
        terminal: bool | None = None,
        transient: bool = False,
    ):
        self.enabled = enabled
        self.stream = stream
        self.terminal = is_terminal(stream) if terminal is None else terminal
        self.transient = transient
        self._rich = None
        self._plain = False
        self._depth = 0
        self._previous_handler: Any = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "Progress":
        self._depth += 1
        if self._depth > 1 or not self.enabled:
            return self
        if self.terminal:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            console = Console(file=self.stream if self.stream is not None else sys.stderr, force_terminal=True)
            self._rich = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                console=console, transient=self.transient,
            )
            self._install_sigterm()
            self._rich.start()
        else:
            self._plain = True
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        self.stop()

    def stop(self) -> None:
        """Stop drawing and give the terminal back (cursor shown); safe to call twice."""
        if self._rich is not None:
            rich, self._rich = self._rich, None
            rich.stop()
        self._plain = False
        self._restore_sigterm()

    def bar(self, label: str, total: int | None, *, min_interval: float = 0.0) -> Bar:
        """A new bar of ``total`` units. In plain mode a line is printed per finished unit, or at
        most one per ``min_interval`` seconds (the last unit always prints)."""
        return Bar(self, label, total, min_interval)

    def print(self, text: str) -> None:
        """A line above the bars (or a plain line), e.g. a note from the work being tracked."""
        if self._rich is not None:
            self._rich.console.print(text, highlight=False, markup=False)
        else:
            self._write(text)

    # ------------------------------------------------------------------ internals
    def _write(self, text: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        print(text, file=stream, flush=True)

    def _install_sigterm(self) -> None:
        # Signal handlers can only be set from the main thread; elsewhere the caller's own handling stands.
        if threading.current_thread() is not threading.main_thread():
            return
        current = signal.getsignal(signal.SIGTERM)
        if current in (signal.SIG_DFL, None):
            self._previous_handler = current
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _restore_sigterm(self) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_handler)
        self._previous_handler = None

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        # Only raise: the handler may run while this thread holds rich's lock, so stopping here could
        # deadlock with the refresh thread; ``__exit__`` stops the display once the stack unwinds.
        raise Terminated()


def install_sigterm_exit() -> Any:
    """Make SIGTERM raise :class:`Terminated` (the CLI does this around a command), so ``finally``
    blocks and context managers run, a live display restores the cursor, and partial output folders
    are cleaned up as on Ctrl-C. Returns the previous handler for :func:`restore_sigterm`."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def restore_sigterm(previous: Any) -> None:
    """Put back the handler :func:`install_sigterm_exit` replaced."""
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)
