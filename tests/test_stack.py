"""`wanlite stack up|status|down`: real servers as background processes, pid files, logs, health."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from wanlite.stack import (
    MLFLOW_SERVER,
    PREFECT_SERVER,
    PREFECT_WORKER,
    LocalStack,
    StackConfig,
    StackError,
    free_port,
    http_ok,
)


def wanlite(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wanlite.cli", *args], capture_output=True, text=True, timeout=600, check=False
    )


@pytest.mark.slow
def test_stack_up_status_down(tmp_path: Path) -> None:
    state = tmp_path / "stack"
    ports = ["--prefect-port", str(free_port()), "--mlflow-port", str(free_port())]
    up = wanlite("stack", "up", "--state-dir", str(state), "--pool", "t-stack", *ports)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        config = LocalStack(state).load_config()
        assert f"export PREFECT_API_URL={config.prefect_api_url}" in up.stdout
        assert f"export MLFLOW_TRACKING_URI={config.mlflow_url}" in up.stdout
        for name in (PREFECT_SERVER, PREFECT_WORKER, MLFLOW_SERVER):
            assert f"{name}" in up.stdout and (state / f"{name}.pid").is_file()
            assert (state / "logs" / f"{name}.log").is_file()
        assert http_ok(f"{config.prefect_api_url}/health") and http_ok(f"{config.mlflow_url}/health")
        pids = {n: LocalStack(state).pid(n) for n in (PREFECT_SERVER, PREFECT_WORKER, MLFLOW_SERVER)}

        status = wanlite("stack", "status", "--state-dir", str(state))
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count("healthy") == 3

        again = wanlite("stack", "up", "--state-dir", str(state), "--pool", "t-stack", *ports)
        assert again.returncode == 0, again.stdout + again.stderr
        assert {n: LocalStack(state).pid(n) for n in pids} == pids, "a second `up` must not start duplicates"

        other = wanlite("stack", "up", "--state-dir", str(state), "--pool", "another-pool", *ports)
        assert other.returncode == 1 and "already running" in other.stderr
    finally:
        down = wanlite("stack", "down", "--state-dir", str(state))
    assert down.returncode == 0 and "stopped" in down.stdout
    alive = [p for p in pids.values() if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive
    assert not http_ok(f"{config.prefect_api_url}/health")
    after = wanlite("stack", "status", "--state-dir", str(state))
    assert after.returncode == 1 and after.stdout.count("stopped") == 3


def test_a_stale_pid_file_is_never_trusted_nor_signalled(tmp_path: Path) -> None:
    """A pid file whose number now belongs to another program: status says stopped, down leaves it alone."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stack = LocalStack(tmp_path)
        stack.save_config(StackConfig())
        stack.pid_path(PREFECT_SERVER).write_text(str(bystander.pid))
        assert stack.pid(PREFECT_SERVER) is None
        assert stack.down() == []
        assert bystander.poll() is None
        assert not stack.pid_path(PREFECT_SERVER).exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_a_port_taken_by_another_program_is_reported_by_name(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = StackConfig(prefect_port=port, mlflow_port=free_port())
        with pytest.raises(StackError, match=f"prefect-server: port 127.0.0.1:{port} is already in use"):
            LocalStack(tmp_path).up(config=config)
    assert LocalStack(tmp_path).running() == []


def test_a_corrupt_state_file_names_itself(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path)
    stack.config_path.write_text(json.dumps({"prefect_port": 1, "colour": "blue"}))
    with pytest.raises(StackError, match="stack.json"):
        stack.load_config()


def test_unknown_service_is_an_error_naming_the_choices(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="expected one of prefect-server, prefect-worker, mlflow-server"):
        LocalStack(tmp_path).command("redis", StackConfig())
