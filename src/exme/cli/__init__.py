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
    """Run the CLI; a user mistake (:class:`ExmeError`) becomes one line on stderr and exit code 2.

    Typer runs in standalone mode, so usage errors (unknown option, bad value) are printed by click
    with exit code 2 as well; only a bug in exme keeps its traceback.
    """
    try:
        app(args=argv, prog_name="exme")
    except ExmeError as err:
        print(f"exme: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def _entry() -> None:
    sys.exit(main())
