"""The `wanlite` command line: discovers one subcommand per module in `wanlite.commands`."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
import traceback

from wanlite import __version__, commands
from wanlite.mlflow_uri import redact_text, redacting_logs


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
    redacting_logs(logging.DEBUG if args.verbose else logging.INFO, "%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except Exception as err:
        if not _user_facing(err):  # a bug: the traceback, with any credential hidden
            print(redact_text("".join(traceback.format_exception(err))), file=sys.stderr, end="")
            return 1
        # Expected, user-facing failures: one clear line, no traceback.
        print(f"wanlite {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2


def _user_facing(err: BaseException) -> bool:
    """Failures whose message says what to fix: bad input, ours, and the MLflow server's answers."""
    # wanlite's own exception classes (StoreError, FetchError, LaunchError, ...) carry messages meant for users.
    return isinstance(err, (FileNotFoundError, ValueError)) or type(err).__module__.startswith(("wanlite.", "mlflow."))


def one_line(err: BaseException) -> str:
    """The error's message with credentials hidden; of MLflow's multi-line answers only the first line."""
    text = str(err).strip() or type(err).__name__
    if type(err).__module__.startswith("mlflow."):
        text = f"MLflow: {text.splitlines()[0]}"
    return redact_text(text)


if __name__ == "__main__":
    sys.exit(main())
