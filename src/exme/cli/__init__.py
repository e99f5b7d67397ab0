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
    bug in exme keeps its traceback. Ctrl-C exits 130 and SIGTERM
    143, each after one line saying what was saved and how to resume.
    """
    import click
    import typer.main

    from exme.cli._common import interrupt_note
    from exme.progress import Terminated, install_sigterm_exit, restore_sigterm

    previous = install_sigterm_exit()
    try:
        # Not standalone: click would turn Ctrl-C into "Aborted!" and exit 1; here it is one line and 130.
        result = typer.main.get_command(app).main(args=argv, prog_name="exme", standalone_mode=False)
    except ExmeError as err:
        print(f"exme: error: {err}", file=sys.stderr)
        return 2
    except click.exceptions.Exit as exit_:
        return exit_.exit_code
    except click.ClickException as err:
        err.show()
        return err.exit_code
    except (Interrupted, KeyboardInterrupt, click.exceptions.Abort):
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


def _entry() -> None:
    sys.exit(main())
