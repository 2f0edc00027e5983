"""Build a task's dataset into data/<task>/ and refresh its card: `python scripts/build_data.py sql`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tunebook.builders import build_task


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("tasks", nargs="+", help="sql, review, qa, summarize")
    parser.add_argument("--out", default="data", help="root of the data directory")
    parser.add_argument("--sources", default="build/sources", help="where downloaded source archives are")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    for task in args.tasks:
        start = time.perf_counter()
        try:
            stats = build_task(task, Path(args.out), Path(args.sources), args.seed)
        except RuntimeError as exc:
            print(f"error: building {task}: {exc}", file=sys.stderr)
            return 1
        print(f"{task}: {stats['sizes']} in {time.perf_counter() - start:.1f}s -> {args.out}/{task}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
