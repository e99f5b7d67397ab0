"""JSON Lines, read the one way every exme input file is read.

Training data, benchmark items and few-shot files are all JSONL written by other tools; a broken
line must be reported with its file and line number before any model is loaded, not as a traceback
from deep inside a run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from exme.errors import ExmeError


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line (1-based numbers).

    A line that is not valid JSON, or not a JSON object, is an :class:`ExmeError` naming
    ``path:line``. The caller checks that the file exists and what a record must hold, since
    only it knows what the file is for.
    """
    with Path(path).open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ExmeError(f"{path}:{line_no}: not valid JSON ({err.msg}); write one JSON object per line") from None
            if not isinstance(record, dict):
                raise ExmeError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            yield line_no, record
