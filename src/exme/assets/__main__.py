"""``python -m exme.assets [records|model|all] [--dir DIR]``: fetch and write the real assets (``make assets``)."""

from __future__ import annotations

import argparse
import sys
import time

from exme.errors import ExmeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exme.assets", description=__doc__)
    parser.add_argument("what", nargs="?", default="all", choices=("all", "records", "model"))
    parser.add_argument("--dir", default=None, help="cache folder (default: $EXME_ASSETS or ~/.cache/exme/assets)")
    args = parser.parse_args(argv)
    from exme.assets import DTYPES, real_model, real_records

    log = lambda msg: print(f"exme assets: {msg}", flush=True)  # noqa: E731
    try:
        if args.what in ("all", "records"):
            started = time.monotonic()
            records = real_records(args.dir, log=log)
            log(f"records in {records.root} ({time.monotonic() - started:.1f} s)")
        if args.what in ("all", "model"):
            started = time.monotonic()
            for dtype in DTYPES:
                path = real_model(dtype, args.dir, log=log)
                log(f"model {dtype}: {path}")
            log(f"model ready ({time.monotonic() - started:.1f} s)")
    except ExmeError as err:
        print(f"exme: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
