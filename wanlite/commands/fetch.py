"""`wanlite fetch SRC`: copy a teacher checkpoint into the store, content-addressed and resumable."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fetch",
        help="copy a Wan 2.2 teacher checkpoint into the store (teachers/<sha16>/) and print its URI",
        description=(
            "Copy a Wan 2.2 T2V-A14B checkpoint (native or diffusers layout) into the object store under "
            "teachers/<sha16>/, where sha16 is a sha256 over every file's path, size and sha256 (so the "
            "whole source is read once to hash it before copying): the same checkpoint always lands at the "
            "same address, a second fetch copies nothing, and a damaged copy gets another address. Symlinks "
            "that point outside the checkpoint (other than a hub cache's blobs/) are refused. Every file is "
            "streamed with its sha256 recorded; an interrupted fetch, run again, skips the files it already "
            "copied; the manifest is written last. "
            "Prints only the teacher's store URI on stdout (progress and logs go to stderr), so "
            "`TEACHER=$(wanlite fetch ...)` works in scripts. "
            "A hub id is downloaded with huggingface_hub first; where the hub is unreachable (offline "
            "machines, HF_HUB_OFFLINE=1) that fails with a clear error: download the checkpoint elsewhere "
            "and pass its local directory instead."
        ),
    )
    parser.add_argument(
        "src",
        metavar="SRC",
        help=(
            "the checkpoint: a local directory, an s3://bucket/prefix (endpoint and credentials from "
            "WANLITE_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), or a Hugging Face hub repo id "
            "such as Wan-AI/Wan2.2-T2V-A14B (used only when no local path of that name exists)"
        ),
    )
    parser.add_argument(
        "--store",
        metavar="URI",
        default=None,
        help="destination store root: file://DIR or s3://bucket/prefix (default: $WANLITE_STORE, else ./.wanlite/store)",
    )
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) for a hub repo id")
    parser.add_argument("--no-progress", action="store_true", help="do not draw progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wanlite.checkpoint.fetch import FetchError, fetch_teacher
    from wanlite.storage import Store, StoreError

    try:
        report = fetch_teacher(args.src, Store.from_env(args.store), progress=not args.no_progress, revision=args.revision)
    except (FetchError, StoreError) as err:
        print(f"wanlite fetch: error: {err}", file=sys.stderr)
        return 2
    print(report["uri"])
    return 0
