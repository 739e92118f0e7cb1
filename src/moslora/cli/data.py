"""``moslora data fetch``: fetch the BIG-bench task files of the built-in ``siqa`` and ``cifar10``
tasks once (from the package index), check them, and keep them in the local cache.

Downloads ``bigbench-1.0.0.tar.gz`` (358 MB) from PyPI, keeps only the task files the built-in
tasks read (44 MB: siqa, bbq, cifar10), checks each against its SHA-256 and deletes the archive. Files already cached
and intact are not fetched again. ``--sdist`` uses an archive you already have instead.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="fetch the BIG-bench data of the built-in siqa and cifar10 tasks", description=__doc__)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    fetch = actions.add_parser("fetch", help="download, check and cache the task files (once)", description=__doc__)
    fetch.add_argument("--sdist", metavar="PATH", help="use this bigbench-1.0.0.tar.gz instead of downloading it")
    fetch.add_argument("--cache", metavar="DIR", help="cache folder (default: $MOSLORA_DATA_DIR, else ~/.cache/moslora, plus bigbench-1.0.0)")
    fetch.add_argument("--no-progress", action="store_true", help="no download bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moslora.compare import bigbench

    cache = Path(args.cache) / "bigbench-1.0.0" if args.cache else None
    try:
        where = bigbench.fetch(args.sdist, cache, progress=not args.no_progress and sys.stderr.isatty())
    except ConnectionError as e:
        print(f"moslora data: error: {e}", file=sys.stderr)
        return 1
    tasks = sorted({name.split("/")[0] for name in bigbench.FILES})
    print(f"BIG-bench task files ready in {where}: {len(bigbench.FILES)} files of {', '.join(tasks)}")
    return 0
