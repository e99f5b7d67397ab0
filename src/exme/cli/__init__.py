"""Command-line entry point. Commands live one area per module and hold no logic of their own."""

from __future__ import annotations

import sys

from exme.cli.app import app
from exme.errors import ExmeError

# Importing a module registers its commands on ``app``.
from exme.cli import merge as _merge  # noqa: F401,E402
from exme.cli import evaluate as _evaluate  # noqa: F401,E402
from exme.cli import pipeline as _pipeline  # noqa: F401,E402
from exme.cli import demo as _demo  # noqa: F401,E402
from exme.cli import report as _report  # noqa: F401,E402


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; a user mistake (:class:`ExmeError`) becomes one line on stderr and exit code 2."""
    try:
        app(args=argv, standalone_mode=False)
    except ExmeError as err:
        print(f"exme: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # typer/click exit with a code
        return int(exit_.code or 0)
    except Exception as err:  # click usage errors come through here in non-standalone mode
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            return 2
        if isinstance(err, click.exceptions.Abort):
            print("exme: aborted", file=sys.stderr)
            return 130
        raise
    return 0


def _entry() -> None:
    sys.exit(main())
