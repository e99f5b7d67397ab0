"""Command-line entry point. Commands live one area per module and hold no logic of their own."""

from __future__ import annotations

import sys

from exme.cli.app import Interrupted, app
from exme.errors import ExmeError

# Importing a module registers its commands on ``app``.
from exme.cli import merge as _merge  # noqa: F401,E402
from exme.cli import evaluate as _evaluate  # noqa: F401,E402
from exme.cli import pipeline as _pipeline  # noqa: F401,E402
from exme.cli import demo as _demo  # noqa: F401,E402
from exme.cli import report as _report  # noqa: F401,E402


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; a user mistake (:class:`ExmeError`) becomes one line on stderr and exit code 2.

    Usage errors (unknown option, bad value) are printed by click with exit code 2 as well; only a
    bug in exme keeps its traceback. Ctrl-C exits 130 and SIGTERM 143, each after one line saying
    what was saved and how to resume.
    """
    import typer.main

    from exme.cli._common import interrupt_note
    from exme.progress import Terminated, install_sigterm_exit, restore_sigterm

    exits, usage_errors, aborts = _click_exceptions()
    previous = install_sigterm_exit()
    try:
        # Not standalone: click would turn Ctrl-C into "Aborted!" and exit 1; here it is one line and 130.
        result = typer.main.get_command(app).main(args=argv, prog_name="exme", standalone_mode=False)
    except ExmeError as err:
        print(f"exme: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # A full, read-only or failing disk met somewhere no writer named the path: still one line.
        import errno

        from exme.io.writer import write_fault_message

        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO):
            raise
        print(f"exme: error: {write_fault_message(err, 'a file')}", file=sys.stderr)
        return 2
    except exits as exit_:
        return exit_.exit_code
    except usage_errors as err:
        err.show()
        return err.exit_code
    except (Interrupted, KeyboardInterrupt, *aborts):
        # Ctrl-C: what was kept and how to go on (exit 130 = 128 + SIGINT, as shells report it).
        print(f"\nexme: interrupted; {interrupt_note()}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"exme: terminated; {interrupt_note()}", file=sys.stderr)
        return 143
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        restore_sigterm(previous)
    return result if isinstance(result, int) else 0


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(exit, usage error, abort) exception classes of click and of typer's bundled copy of click
    (typer >= 0.2x raises its own), so a bad option value is click's one-line usage error, exit 2."""
    import click
    import typer

    exits: list[type] = [click.exceptions.Exit, typer.Exit]
    usage: list[type] = [click.ClickException]
    aborts: list[type] = [click.exceptions.Abort, typer.Abort]
    try:
        from typer._click import exceptions as bundled
    except ImportError:  # a typer that uses click itself
        bundled = None
    if bundled is not None:
        exits += [c for c in (getattr(bundled, "Exit", None),) if c is not None]
        usage += [c for c in (getattr(bundled, "ClickException", None),) if c is not None]
        aborts += [c for c in (getattr(bundled, "Abort", None),) if c is not None]
    return tuple(exits), tuple(usage), tuple(aborts)


def _entry() -> None:
    sys.exit(main())
