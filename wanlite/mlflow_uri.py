"""MLflow tracking URIs: credentials redacted before anything is logged, stored or raised; a fast reachability check.

A tracking URI may carry a password (`http://user:PASSWORD@host`). wanlite
never writes one anywhere: log lines, MLflow run params, manifests and error
messages get `redact_uri` / `redact_text`. MLflow itself reads credentials
from the URI or from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (the
better place: they never appear in a command line or a Prefect parameter).

MLflow's HTTP client retries a refused connection for minutes (7 retries with
exponential backoff by default) before it fails; `prepare_tracking` asks the
server's `/health` once, with a short timeout, so an unreachable server is
reported in seconds (and creates a fresh SQLite database's schema under a lock).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REACHABLE_TIMEOUT_S = 5.0
"""Seconds to wait for the server's /health before calling it unreachable."""

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s'\"]+)@")


class TrackingError(RuntimeError):
    """The MLflow server cannot be used (unreachable, refused the request); the message holds no credential."""


def redact_uri(uri: str | None) -> str | None:
    """uri without its `user:password@` part (None stays None)."""
    if not uri:
        return uri
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, f"***@{netloc}", parts.path, parts.query, parts.fragment))


def redact_text(text: str) -> str:
    """Every `scheme://user:password@` in a message (an exception's text, a log line) with the userinfo hidden."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}***@", text)


def prepare_tracking(uri: str | None) -> None:
    """Make the tracking URI usable before MLflow is asked anything, or say in seconds why it is not.

    http(s): the server's `/health` must answer within REACHABLE_TIMEOUT_S
    (any HTTP answer, even 401/404, means it is there; a refused, unresolvable
    or silent connection raises TrackingError). sqlite:///FILE: the schema is
    created under an exclusive lock on FILE.lock, so two processes starting on
    a fresh database (two `wanlite demo` at once) do not both run MLflow's
    alembic migrations (the second used to die on "table already exists").
    uri None means MLflow's own default, $MLFLOW_TRACKING_URI.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return
    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https"):
        _require_reachable(uri)
    elif scheme == "sqlite" and uri.startswith("sqlite:///"):
        _create_schema_locked(uri)


def _require_reachable(uri: str) -> None:
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=REACHABLE_TIMEOUT_S)
    except requests.RequestException as err:
        raise TrackingError(
            f"MLflow server {redact_uri(uri)} is unreachable ({type(err).__name__}); check --tracking-uri / "
            "MLFLOW_TRACKING_URI and that the server is running"
        ) from None


def _create_schema_locked(uri: str) -> None:
    import fcntl

    from mlflow.tracking import MlflowClient

    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process is killed
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # creates or upgrades the schema


def ensure_experiment(client: Any, name: str, artifact_location: str | None = None) -> str:
    """The experiment's id, creating it if needed; another process creating it first is not an error."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        found = client.get_experiment_by_name(name)  # created concurrently: use it
        if found is None:
            raise
        return found.experiment_id


class RedactingFormatter(logging.Formatter):
    """Log lines (ours and every library's) with any `scheme://user:password@` hidden."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return redact_text(super().formatException(ei))


def redacting_logs(level: int, fmt: str) -> None:
    """logging.basicConfig(level, fmt), with every root handler redacting credentials."""
    logging.basicConfig(level=level, format=fmt)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(RedactingFormatter(fmt))
