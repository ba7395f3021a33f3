"""The `wanlite` command line: discovers one subcommand per module in `wanlite.commands`."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from wanlite import __version__, commands
from wanlite.config import ConfigError
from wanlite.storage import StoreError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wanlite",
        description=(
            "Distil Wan 2.2 T2V-A14B into a small Wan-architecture text-to-image model and ship it "
            "to ComfyUI, diffusers and MLflow. Every step reads and writes URIs in the object store "
            "(WANLITE_STORE, default a local directory)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"wanlite {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (ConfigError, StoreError, FileNotFoundError, ValueError) as err:
        # Expected, user-facing failures: one clear line, no traceback.
        print(f"wanlite {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
