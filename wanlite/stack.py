"""The local server stack: Prefect server + process worker + MLflow server, no Docker.

`wanlite stack up` gives a laptop the same control plane the cluster has (see
infra/compose.yaml), so `prefect deploy` / `prefect deployment run` and the
MLflow UI work locally. Each service is an ordinary background process started
from this interpreter's environment (`python -m prefect`, `python -m mlflow`),
so the stack runs exactly the versions wanlite is pinned to. This module never
imports prefect: the stack is driven through the executables and HTTP health
endpoints, the same way a user would check it by hand.

State lives in one directory (default `.wanlite/stack`, or `$WANLITE_STACK_DIR`):
`stack.json` (ports, pool, URLs), `<service>.pid`, `logs/<service>.log`,
`prefect/` (PREFECT_HOME: the SQLite database and local result storage) and
`mlflow/` (SQLite backend and proxied artifacts).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

PREFECT_SERVER = "prefect-server"
PREFECT_WORKER = "prefect-worker"
MLFLOW_SERVER = "mlflow-server"
SERVICES = (PREFECT_SERVER, PREFECT_WORKER, MLFLOW_SERVER)
"""Start order: the worker needs a healthy server to register with."""

DEFAULT_POOL = "wanlite-local"
STOP_GRACE_S = 20.0


class StackError(RuntimeError):
    """A service that cannot be started, or that never became healthy (message names it and its log)."""


def default_state_dir() -> Path:
    return Path(os.environ.get("WANLITE_STACK_DIR", ".wanlite/stack")).absolute()


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free now; the service binds it moments later."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def http_json(url: str, timeout: float = 2.0) -> object | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


@dataclass(frozen=True)
class StackConfig:
    """What `up` chose; persisted so `status` and `down` need no flags."""

    host: str = "127.0.0.1"
    prefect_port: int = 4200
    mlflow_port: int = 5000
    pool: str = DEFAULT_POOL
    worker_env: dict[str, str] = field(default_factory=dict)

    @property
    def prefect_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_url}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | None
    running: bool
    healthy: bool
    url: str | None
    log: Path

    def describe(self) -> str:
        state = "healthy" if self.healthy else ("running, not healthy" if self.running else "stopped")
        where = f"  {self.url}" if self.url else ""
        pid = f" (pid {self.pid})" if self.running else ""
        return f"{self.name:<15} {state}{pid}{where}"


class LocalStack:
    """Start, stop and inspect the local services under one state directory."""

    def __init__(self, state_dir: Path | None = None) -> None:
        self.state_dir = Path(state_dir or default_state_dir()).absolute()
        self.logs_dir = self.state_dir / "logs"

    # --- configuration --------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.state_dir / "stack.json"

    def load_config(self) -> StackConfig | None:
        if not self.config_path.exists():
            return None
        try:
            return StackConfig(**json.loads(self.config_path.read_text()))
        except (ValueError, TypeError) as err:
            raise StackError(f"{self.config_path}: not a stack config written by `wanlite stack up` ({err})") from None

    def save_config(self, config: StackConfig) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(asdict(config), indent=2))

    def client_env(self, config: StackConfig) -> dict[str, str]:
        """Variables a shell (or a test) needs to talk to this stack."""
        return {
            "PREFECT_HOME": str(self.state_dir / "prefect"),
            "PREFECT_API_URL": config.prefect_api_url,
            "MLFLOW_TRACKING_URI": config.mlflow_url,
        }

    # --- the services ---------------------------------------------------------------
    def _service_env(self, config: StackConfig) -> dict[str, str]:
        env = {**os.environ, **self.client_env(config)}
        # No outbound telemetry from a local stack; loopback only.
        env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
        env["DO_NOT_TRACK"] = "1"
        return env

    def command(self, name: str, config: StackConfig) -> tuple[list[str], dict[str, str]]:
        """argv and environment of one service."""
        env = self._service_env(config)
        py = sys.executable
        if name == PREFECT_SERVER:
            env.pop("PREFECT_API_URL")  # the server must not try to reach itself as a client
            argv = [py, "-m", "prefect", "server", "start", "--host", config.host, "--port", str(config.prefect_port)]
        elif name == PREFECT_WORKER:
            env.update(config.worker_env)
            argv = [py, "-m", "prefect", "worker", "start", "--pool", config.pool, "--type", "process"]
        elif name == MLFLOW_SERVER:
            env.pop("MLFLOW_TRACKING_URI")
            mlflow_dir = self.state_dir / "mlflow"
            mlflow_dir.mkdir(parents=True, exist_ok=True)
            argv = [
                py, "-m", "mlflow", "server",
                "--host", config.host,
                "--port", str(config.mlflow_port),
                "--workers", "1",
                "--backend-store-uri", f"sqlite:///{mlflow_dir / 'mlflow.db'}",
                "--artifacts-destination", (mlflow_dir / "artifacts").as_uri(),
            ]  # fmt: skip
        else:
            raise StackError(f"service: unknown service {name!r}; expected one of {', '.join(SERVICES)}")
        return argv, env

    def url(self, name: str, config: StackConfig) -> str | None:
        return {PREFECT_SERVER: config.prefect_url, MLFLOW_SERVER: config.mlflow_url}.get(name)

    def healthy(self, name: str, config: StackConfig) -> bool:
        """Health as a user would check it: the HTTP endpoint, or a READY work pool for the worker."""
        if name == PREFECT_SERVER:
            return http_ok(f"{config.prefect_api_url}/health")
        if name == MLFLOW_SERVER:
            return http_ok(f"{config.mlflow_url}/health")
        pool = http_json(f"{config.prefect_api_url}/work_pools/{config.pool}")
        return isinstance(pool, dict) and pool.get("status") == "READY"

    # --- processes ------------------------------------------------------------------
    def pid_path(self, name: str) -> Path:
        return self.state_dir / f"{name}.pid"

    def log_path(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def pid(self, name: str) -> int | None:
        """The pid recorded for `name`, only if that process is alive and still ours.

        Checking the command line guards against a stale pid file whose number the
        OS has since given to an unrelated process, which `down` must never signal.
        """
        try:
            pid = int(self.pid_path(name).read_text().strip())
            proc = psutil.Process(pid)
            alive = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
            ours = alive and self._marker(name) in " ".join(proc.cmdline())
        except (FileNotFoundError, ValueError, psutil.Error):
            return None
        return pid if ours else None

    @staticmethod
    def _marker(name: str) -> str:
        return {PREFECT_SERVER: "prefect server start", PREFECT_WORKER: "prefect worker start"}.get(
            name, "mlflow server"
        )

    def start(self, name: str, config: StackConfig) -> int:
        """Start one service in its own session (so `stop` can end it with its children)."""
        running = self.pid(name)
        if running:
            return running
        argv, env = self.command(name, config)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path(name), "ab") as logfile:
            proc = subprocess.Popen(
                argv, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=self.state_dir, start_new_session=True,
            )  # fmt: skip
        self.pid_path(name).write_text(str(proc.pid))
        log.info("started %s (pid %d), log %s", name, proc.pid, self.log_path(name))
        return proc.pid

    def wait_healthy(self, name: str, config: StackConfig, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.healthy(name, config):
                return
            if self.pid(name) is None:
                raise StackError(f"{name} exited during start-up; log {self.log_path(name)}:\n{self._tail(name)}")
            time.sleep(0.25)
        raise StackError(
            f"{name} did not become healthy within {timeout_s:.0f} s; log {self.log_path(name)}:\n{self._tail(name)}"
        )

    def _tail(self, name: str, chars: int = 3000) -> str:
        try:
            return self.log_path(name).read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"

    def stop(self, names: Sequence[str]) -> list[str]:
        """Stop services with their process groups; returns the names that were running.

        All get SIGTERM at once and share one grace period (the servers shut
        down in parallel); whatever outlives it gets SIGKILL.
        """
        procs: dict[str, psutil.Process] = {}
        for name in names:
            pid = self.pid(name)
            self.pid_path(name).unlink(missing_ok=True)
            if pid is None:
                continue
            try:
                procs[name] = psutil.Process(pid)
                os.killpg(pid, signal.SIGTERM)
            except (ProcessLookupError, psutil.NoSuchProcess):
                procs.pop(name, None)
        _, alive = psutil.wait_procs(list(procs.values()), timeout=STOP_GRACE_S)
        for proc in alive:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for name, proc in procs.items():
            log.info("stopped %s (pid %d)", name, proc.pid)
        return list(procs)

    # --- the whole stack --------------------------------------------------------------
    def up(
        self,
        *,
        config: StackConfig | None = None,
        services: Sequence[str] = SERVICES,
        timeout_s: float = 180.0,
    ) -> list[ServiceStatus]:
        """Start `services` (in start order), waiting for each to be healthy before the next.

        Re-running `up` on a running stack keeps its ports; a port taken by some
        other program is an error naming it, never a silent second server.
        """
        config = self._resolve_config(config)
        for name, port in ((PREFECT_SERVER, config.prefect_port), (MLFLOW_SERVER, config.mlflow_port)):
            if name in services and self.pid(name) is None and port_in_use(config.host, port):
                raise StackError(
                    f"{name}: port {config.host}:{port} is already in use by another program; "
                    f"choose another with --{name.split('-')[0]}-port"
                )
        self.save_config(config)
        for name in (s for s in SERVICES if s in services):
            self.start(name, config)
            self.wait_healthy(name, config, timeout_s)
        return self.status()

    def _resolve_config(self, requested: StackConfig | None) -> StackConfig:
        """The running stack's config when one runs (a different request is an error), else the request."""
        current = self.load_config() if self.running() else None
        if current is None:
            return requested or StackConfig()
        if requested is not None and requested != current:
            raise StackError(
                f"{self.config_path}: a stack is already running with {asdict(current)}; "
                "run `wanlite stack down` before starting one with different settings"
            )
        return current

    def down(self) -> list[str]:
        """Stop every running service (all signalled at once); returns the names stopped."""
        return self.stop(list(reversed(SERVICES)))

    def running(self) -> list[str]:
        return [name for name in SERVICES if self.pid(name) is not None]

    def status(self) -> list[ServiceStatus]:
        config = self.load_config() or StackConfig()
        result = []
        for name in SERVICES:
            pid = self.pid(name)
            result.append(
                ServiceStatus(
                    name=name,
                    pid=pid,
                    running=pid is not None,
                    healthy=pid is not None and self.healthy(name, config),
                    url=self.url(name, config),
                    log=self.log_path(name),
                )
            )
        return result


def export_lines(env: Mapping[str, str]) -> list[str]:
    """Shell lines that point a terminal at the stack."""
    return [f"export {key}={value}" for key, value in env.items()]
