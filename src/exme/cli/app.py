"""The shared Typer application; each ``exme.cli.<area>`` module registers its commands on it."""

import typer

app = typer.Typer(
    name="exme",
    help="Extrapolation Merging: rank SFT checkpoints, extrapolate, merge, and report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
