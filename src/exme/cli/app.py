"""The shared Typer application; each ``exme.cli.<area>`` module registers its commands on it."""

import typer


def _root() -> None:
    """Extrapolation Merging: rank SFT checkpoints, extrapolate, merge, and report."""
    # A root callback keeps `exme` a command group even while only one command is registered, so
    # `exme <command> ...` parses the same however many areas have added theirs.


app = typer.Typer(
    name="exme",
    help="Extrapolation Merging: rank SFT checkpoints, extrapolate, merge, and report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    callback=_root,
)
