"""What every wanlite flow shares: cache policy, retry policy, result settings, artifacts.

Flows only wire `wanlite` step functions (DESIGN.md §1); the decisions about
*when* a step may be skipped or retried live here, once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext

import wanlite

RESULT_SERIALIZER = "json"
"""Step outputs are small JSON manifests (URIs, sha256, metrics): readable by any
Python/Prefect version that shares the result storage, unlike pickles."""

STEP_RETRIES = 3
STEP_RETRY_DELAYS = [10, 60, 300]


@cache
def code_fingerprint() -> str:
    """sha256 over the installed wanlite package sources and data files.

    TASK_SOURCE only hashes the wrapper task's own source, and a step's maths
    lives in `wanlite`, so a cache entry must also be invalidated by any change
    to the package: a fixed objective must not be served a stale student.
    """
    root = Path(wanlite.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in {".py", ".txt", ".json"}):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclass
class WanliteCode(CachePolicy):
    """Cache-key component: the wanlite code version (see `code_fingerprint`)."""

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        return code_fingerprint()


STEP_CACHE = INPUTS + TASK_SOURCE + WanliteCode()
"""Cross-run cache (never RUN_ID): same step inputs + same code = same output.
Step inputs are content-addressed store URIs and configs, so they fix the output."""


class StepFailed(RuntimeError):
    """A child step ended in a non-Completed state; `transient` when its infrastructure crashed."""

    def __init__(self, step: str, state_name: str, message: str, *, transient: bool) -> None:
        super().__init__(f"step {step!r} ended {state_name}: {message}")
        self.step = step
        self.transient = transient


def _transient_types() -> tuple[type[BaseException], ...]:
    """Network-level failures worth retrying (imported lazily: the flows import fast)."""
    import botocore.exceptions
    import httpx
    import requests

    return (
        ConnectionError,  # builtin: refused / reset / aborted
        TimeoutError,
        botocore.exceptions.ConnectionError,
        botocore.exceptions.HTTPClientError,
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        httpx.TransportError,
    )


def is_transient(exc: BaseException | None) -> bool:
    """True when `exc`, or anything in its cause chain, is a network or infrastructure hiccup.

    Bad input (a corrupt teacher, a wrong config, a failed gate) is never
    transient: retrying it only delays the failure report.
    """
    types = _transient_types()
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StepFailed):
            return exc.transient
        if isinstance(exc, types):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only transient failures."""
    return is_transient(state.result(raise_on_failure=False))


STEP_TASK_OPTIONS: dict[str, Any] = {
    "cache_policy": STEP_CACHE,
    "retries": STEP_RETRIES,
    "retry_delay_seconds": STEP_RETRY_DELAYS,
    "retry_condition_fn": retry_if_transient,
    "persist_result": True,
    "result_serializer": RESULT_SERIALIZER,
}
"""How every step task runs, in-process (flows.steps) or as a child deployment (flows.distill):
cached across runs, retried only on transient failures, with a JSON result."""


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of `rows` (columns from the first row)."""
    if not rows:
        return "(none)"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in cols) + " |" for row in rows]
    return "\n".join(lines)
