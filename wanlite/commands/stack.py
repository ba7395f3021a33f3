"""`wanlite stack up|down|status`: the local Prefect + MLflow servers as background processes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wanlite.stack import DEFAULT_POOL, LocalStack, StackConfig, StackError, default_state_dir, export_lines


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "stack",
        help="start, stop or inspect the local Prefect server + worker and MLflow server",
        description=(
            "Run the control plane on this machine without Docker: a Prefect server (SQLite), a process "
            "worker polling one work pool, and an MLflow tracking server (SQLite backend, proxied "
            "artifacts). Each runs in the background with a pid file and a log under the state directory. "
            "Point your shell at it with the printed `export` lines, then `prefect deploy --all` and "
            "`prefect deployment run distill/tiny`."
        ),
    )
    parser.add_argument("action", choices=("up", "down", "status"), help="what to do with the stack")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="pid files, logs, databases and artifacts (default $WANLITE_STACK_DIR or .wanlite/stack)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address the servers bind (default 127.0.0.1)")
    parser.add_argument("--prefect-port", type=int, default=4200, help="Prefect server port (default 4200)")
    parser.add_argument("--mlflow-port", type=int, default=5000, help="MLflow server port (default 5000)")
    parser.add_argument(
        "--pool", default=DEFAULT_POOL, help=f"process work pool the worker polls (default {DEFAULT_POOL})"
    )
    parser.add_argument(
        "--timeout", type=float, default=180.0, help="seconds to wait for each service to become healthy"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    stack = LocalStack(args.state_dir or default_state_dir())
    try:
        if args.action == "up":
            config = StackConfig(
                host=args.host, prefect_port=args.prefect_port, mlflow_port=args.mlflow_port, pool=args.pool
            )
            statuses = stack.up(config=config, timeout_s=args.timeout)
        elif args.action == "down":
            stopped = stack.down()
            print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
            return 0
        else:
            statuses = stack.status()
    except StackError as err:
        print(f"wanlite stack {args.action}: error: {err}", file=sys.stderr)
        return 1
    for status in statuses:
        print(status.describe())
    print(f"state and logs: {stack.state_dir}")
    config = stack.load_config()
    if config is not None and any(s.running for s in statuses):
        print("point a shell at it:")
        for line in export_lines(stack.client_env(config)):
            print(f"  {line}")
        print(f"work pool: {config.pool}  (deploy with WANLITE_CPU_POOL=WANLITE_GPU_POOL={config.pool})")
    return 0 if all(s.healthy for s in statuses) or args.action == "down" else 1
