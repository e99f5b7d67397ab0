"""`exme` commands for the pipeline area. Thin wrappers: parse options, call the library, print."""

from __future__ import annotations

from exme.cli.app import app  # noqa: F401
