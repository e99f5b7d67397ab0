"""The shared Typer application; each ``exme.cli.<area>`` module registers its commands on it."""

from typing import Any, Optional

import click
import typer
from typer.core import TyperCommand


class Interrupted(Exception):
    """Ctrl-C inside a command. Typer would turn the ``KeyboardInterrupt`` into a silent exit 130;
    carried as this exception instead, :func:`exme.cli.main` can say what was saved first."""


class _Command(TyperCommand):
    """Usage lines in the Unix convention (``exme merge [OPTIONS] CONFIG OUT``, not ``{config}``),
    and Ctrl-C passed on to :func:`exme.cli.main` as :class:`Interrupted`."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as err:
            raise Interrupted() from err

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar or (param.name or "").upper()
                name = name if param.required else f"[{name}]"
                pieces.append(name + ("..." if param.nargs != 1 else ""))
        return pieces


class _App(typer.Typer):
    """Every command gets :class:`_Command`; help is plain click text, so flags show no ``<bool>``."""

    def command(self, *args: Any, cls: Any = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or _Command, **kwargs)


def _show_version(value: bool) -> None:
    if value:
        from exme import __version__

        typer.echo(f"exme {__version__}")
        raise typer.Exit()


def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", is_eager=True, callback=_show_version, help="Print exme's version and exit."
    ),
) -> None:
    """Extrapolation Merging: rank SFT checkpoints, extrapolate, merge, and report."""
    # A root callback keeps `exme` a command group even while only one command is registered, so
    # `exme <command> ...` parses the same however many areas have added theirs.


app = _App(
    name="exme",
    help="Extrapolation Merging: rank SFT checkpoints, extrapolate, merge, and report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    callback=_root,
)
