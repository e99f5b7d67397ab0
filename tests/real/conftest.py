"""Real assets for tests: the cached records and model of :mod:`exme.assets`.

Fetched on first use (``make test`` runs ``make assets`` first). When they cannot be had, a test
fails with the reason under CI (``CI=true``) and is skipped with the reason elsewhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from exme.errors import ExmeError


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"real assets unavailable under CI: {reason}", pytrace=False)
    pytest.skip(f"real assets unavailable: {reason}")


@pytest.fixture(scope="session")
def real():
    from exme.assets import real_records

    try:
        return real_records()
    except ExmeError as err:
        _unavailable(str(err))


@pytest.fixture(scope="session")
def real_model_dir():
    from exme.assets import real_model

    try:
        return real_model("float32")
    except ExmeError as err:
        _unavailable(str(err))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open(encoding="utf-8")]
