"""The ``moslora`` command line. Each subcommand lives in its own module of this package with
``add_parser(subparsers)`` that registers it and sets ``func`` to the function that runs it."""

from __future__ import annotations

import argparse
import importlib
import sys

from moslora.cli import console
from moslora.cli.extras import MissingDependency

# One module per subcommand, in the order ``moslora --help`` lists them.
SUBCOMMANDS = ("demo", "train", "eval", "export", "compare", "generate", "data")


def build_parser() -> argparse.ArgumentParser:
    from moslora.version import __version__

    parser = argparse.ArgumentParser(prog="moslora", description="MoSLoRA adapters: train, evaluate, compare, export.")
    parser.add_argument("--version", action="version", version=f"moslora {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"moslora.cli.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    console.setup()  # before any third-party library is imported
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MissingDependency as e:
        print(f"moslora {args.command}: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError) as e:
        # Bad input: one clear line, not a traceback. Bugs (other exceptions) keep their traceback.
        print(f"moslora {args.command}: error: {e}", file=sys.stderr)
        return 2


def run() -> None:
    """The ``moslora`` program: :func:`main`, then exit; a rank of a distributed run leaves its
    process group first (:func:`moslora.model.sharded.exit_process`)."""
    code = main()
    if "torch.distributed" not in sys.modules:  # nothing started a group: no need to import torch
        sys.exit(code)
    from moslora.model.sharded import exit_process

    exit_process(code)


if __name__ == "__main__":
    run()
