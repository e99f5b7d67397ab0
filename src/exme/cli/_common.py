"""Options and start-up steps shared by every heavy command: device, threads, verbosity, interrupts.

Each command calls :func:`start` first, so a device that cannot work is refused before any folder is
created, the thread count is set and printed once, and Ctrl-C knows what to say.
"""

from __future__ import annotations

from typing import Optional

import typer

THREADS_HELP = (
    "torch CPU threads. Default: the CPUs not busy with other work (1 on a 2-core machine running "
    "another job); torch's one-per-core collapses when cores are shared."
)


def threads_option() -> Optional[int]:
    return typer.Option(None, "--threads", metavar="N|auto", help=THREADS_HELP, show_default=False)


def verbose_option() -> bool:
    return typer.Option(
        False, "--verbose", "-v",
        help="Show library output: transformers' loading bars and messages, merge notes, training logs.",
    )


#: What Ctrl-C (or SIGTERM) prints: what was saved and how to go on. Set by the running command.
_interrupt_note = "nothing was saved"


def on_interrupt(note: str) -> None:
    """Set the sentence :func:`exme.cli.main` prints when the command is interrupted."""
    global _interrupt_note
    _interrupt_note = note


def interrupt_note() -> str:
    return _interrupt_note


def start(
    *,
    device: str | None = None,
    threads: int | str | None = None,
    verbose: bool = False,
    header: bool = True,
    interrupted: str = "nothing was saved",
    threads_source: str = "--threads",
) -> int:
    """Check the device, set verbosity and torch threads, print the run header; returns the thread count."""
    from exme.runtime import check_device, set_verbose
    from exme.threads import apply_threads, describe_threads

    on_interrupt(interrupted)
    if device is not None:
        check_device(device)
    set_verbose(verbose)
    n = apply_threads(threads, source=threads_source)
    if header:
        # stdout, with the command's results: stderr stays one line when a mistake is refused.
        print(f"exme {_version()} · {'device ' + device + ' · ' if device else ''}{describe_threads(n, threads)}", flush=True)
    return n


def _version() -> str:
    from exme import __version__

    return __version__
