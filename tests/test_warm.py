"""A warm-started cell is the cell: same numbers as a cold process, same log and exit code; without a server the
command runs in its own process; a cancelled job's cell stops."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from normbench.results import read_json, read_jsonl
from normbench.warm import SOCKET_ENV, start_server

NORMBENCH = [sys.executable, "-m", "normbench.cli"]


@pytest.fixture
def warm_server(tmp_path):
    """A server started as the workflow starts it; yields the environment that points commands at it."""
    socket_path = tmp_path / "warm.sock"
    server = start_server(socket_path, tmp_path / "warm.log")
    assert server is not None, (tmp_path / "warm.log").read_text()
    yield {**os.environ, SOCKET_ENV: str(socket_path)}
    server.terminate()
    server.wait(timeout=30)


def cell_words(fashion_root, **extra):
    words = {"data_root": str(fashion_root), "model": "mlp", "width": 16, "train_subset": 512, "test_subset": 200,
             "batch_size": 64, "epochs": 2, "evals_per_epoch": 2, "device": "cpu", **extra}
    return [f"{key}={value}" for key, value in words.items()]


def train(out: Path, words: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([*NORMBENCH, "train", "--out", str(out), "--threads", "1", "--set", *words],
                          env=env, capture_output=True, text=True, timeout=300)


def test_a_warm_cell_trains_what_a_cold_process_trains(tmp_path, fashion_root, warm_server):
    words = cell_words(fashion_root, norm="bn", probes="[generalization]")
    warm, cold = train(tmp_path / "warm", words, warm_server), train(tmp_path / "cold", words, dict(os.environ))
    assert warm.returncode == cold.returncode == 0, warm.stderr
    assert "step 16/16" in warm.stdout and "final test acc" in warm.stdout  # the client's own streams
    numbers = ["step", "train_loss", "test_loss", "test_acc"]
    assert [[row[k] for k in numbers] for row in read_jsonl(tmp_path / "warm" / "metrics.jsonl")] == \
        [[row[k] for k in numbers] for row in read_jsonl(tmp_path / "cold" / "metrics.jsonl")]
    assert read_jsonl(tmp_path / "warm" / "probes.jsonl") == read_jsonl(tmp_path / "cold" / "probes.jsonl")
    assert read_json(tmp_path / "warm" / "config.json") == read_json(tmp_path / "cold" / "config.json")


def test_a_warm_error_is_the_commands_error(tmp_path, fashion_root, warm_server):
    failed = train(tmp_path / "cell", cell_words(fashion_root, norm="batchnorm"), warm_server)
    assert failed.returncode == 1
    assert "normbench: error: setting 'norm': unknown norm 'batchnorm'; known: bn, " in failed.stderr


def test_without_a_server_the_command_runs_alone(tmp_path, fashion_root):
    env = {**os.environ, SOCKET_ENV: str(tmp_path / "nobody-listens.sock")}
    done = train(tmp_path / "cell", cell_words(fashion_root), env)
    assert done.returncode == 0 and (tmp_path / "cell" / "summary.json").exists()


def test_a_cancelled_client_stops_its_cell(tmp_path, fashion_root, warm_server):
    """Snakemake cancels a job by ending its process: the forked cell must not train on unseen."""
    words = cell_words(fashion_root, train_subset=4096, batch_size=8, epochs=50, evals_per_epoch=1)
    client = subprocess.Popen([*NORMBENCH, "train", "--out", str(tmp_path / "cell"), "--threads", "1",
                               "--set", *words], env=warm_server, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "cell" / "config.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    client.send_signal(signal.SIGKILL)
    client.wait()
    time.sleep(2)
    started = (tmp_path / "cell" / "metrics.jsonl").stat().st_mtime if (tmp_path / "cell" / "metrics.jsonl").exists() \
        else None
    time.sleep(3)  # an epoch here takes under a second: a live cell would have written again
    after = (tmp_path / "cell" / "metrics.jsonl").stat().st_mtime if (tmp_path / "cell" / "metrics.jsonl").exists() \
        else None
    assert started == after and not (tmp_path / "cell" / "summary.json").exists()


def ask(env: dict, message: bytes, fds: list[int] | None = None) -> bytes:
    """Send one raw request to the warm server and return its reply (an exit code byte, or b"" if it hung up)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as connection:
        connection.connect(env[SOCKET_ENV])
        if fds is None:
            connection.send(message)
        else:
            socket.send_fds(connection, [message], fds)
        return connection.recv(1)


def test_malformed_requests_are_refused_and_the_server_goes_on(warm_server, tmp_path, fashion_root):
    streams = [0, 1, 2]
    assert ask(warm_server, b"{not json", streams) == bytes([2])
    assert ask(warm_server, b'{"argv": ["train"], "cwd": "/", "env": {}}') == bytes([2])  # no descriptors
    assert ask(warm_server, b'{"argv": "train", "cwd": "/", "env": {}}', streams) == bytes([2])  # argv no list
    log = (tmp_path / "warm.log").read_text()
    assert log.count("refused a malformed request") == 3 and "Traceback" not in log
    run = train(tmp_path / "cell", cell_words(fashion_root, epochs=1), warm_server)
    assert run.returncode == 0, run.stderr  # the server still serves


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another user")
def test_the_server_takes_requests_from_its_own_user_only(tmp_path):
    """Even with a socket anyone may open (mode 777 in a public folder), another user's request is not run."""
    import json
    import shutil
    import tempfile

    public = Path(tempfile.mkdtemp(prefix="normbench-test-"))
    public.chmod(0o777)
    server = start_server(public / "warm.sock", tmp_path / "warm.log")
    try:
        (public / "warm.sock").chmod(0o777)
        env = {SOCKET_ENV: str(public / "warm.sock")}
        request = json.dumps({"argv": ["--version"], "cwd": "/", "env": dict(os.environ)}).encode()
        child = os.fork()
        if child == 0:  # another user
            try:
                os.setgid(65534)
                os.setuid(65534)
                try:
                    reply = ask(env, request, [0, 1, 2])
                except (ConnectionResetError, BrokenPipeError):  # the server closed without reading the request
                    reply = b""
                os._exit(0 if reply == b"" else 1)  # 0: hung up on, nothing run
            except BaseException:  # noqa: BLE001  any failure to reach the server is not the check we want
                os._exit(3)
        assert os.waitpid(child, 0)[1] == 0
        assert "refused a request from pid" in (tmp_path / "warm.log").read_text()
        assert ask(env, request, [0, 1, 2]) == bytes([0])  # its own user: served
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(public)
