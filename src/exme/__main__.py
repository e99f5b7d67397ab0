"""`python -m exme` runs the CLI."""

from exme.cli import _entry

_entry()
