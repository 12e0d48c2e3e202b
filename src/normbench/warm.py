"""Warm starts: one server process that has imported torch and normbench forks a child for each `normbench train`.

A workflow of many short cells would otherwise pay Python's and torch's start-up
(2-4 s on a small CPU) once per cell. The workflow starts the server when it
runs jobs on this machine and points NORMBENCH_WARM_SOCKET at it. `normbench
train` then sends its command line, working folder, environment and standard
streams (the file descriptors themselves) over the socket and waits for the exit
code; the forked child runs the command exactly as the process would have. Each
cell is still its own job with its own log; where no server answers (a cluster
node, a hand-run command) the command runs in its own process as before.

The server never runs a torch operation itself, so no thread pool exists when
it forks. A child whose client goes away (a cancelled job) ends with its
process group; the server ends when the workflow that started it does.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

SOCKET_ENV = "NORMBENCH_WARM_SOCKET"
MAX_REQUEST_BYTES = 1 << 20


def run_warm(argv: list[str]) -> int | None:
    """Run `normbench <argv>` in the warm server and return its exit code; None where no server answers."""
    path = os.environ.get(SOCKET_ENV)
    if not path:
        return None
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        connection.connect(path)
    except OSError:
        connection.close()
        return None
    request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}
    with connection:
        sys.stdout.flush()
        sys.stderr.flush()
        socket.send_fds(connection, [json.dumps(request).encode()], [0, 1, 2])
        reply = connection.recv(1)
    if not reply:
        print("normbench: error: the warm server's worker ended without an exit code (killed?)", file=sys.stderr)
        return 1
    return reply[0]


def serve(path: str | Path, run: Callable[[list[str]], None]) -> None:
    """Accept commands on the Unix socket `path` until the process that started this server ends; each runs as
    `run(argv)` (the command line's main) in a forked child."""
    import torch._dynamo  # noqa: F401  the imports every cell needs, once: torch.optim loads dynamo (about 2 s)
    import torch.fx.experimental.optimization  # noqa: F401  BN folding

    import normbench.cells  # noqa: F401
    import normbench.probes  # noqa: F401
    import normbench.train  # noqa: F401

    parent = os.getppid()
    path = Path(path)
    path.unlink(missing_ok=True)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps finished children
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as server:
        server.bind(str(path))
        server.listen(16)
        server.settimeout(1.0)
        while os.getppid() == parent:
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            if not _from_this_user(connection):
                connection.close()
                continue
            if os.fork() == 0:
                server.close()
                _run_child(connection, run)
            connection.close()
    path.unlink(missing_ok=True)


def _from_this_user(connection: socket.socket) -> bool:
    """Whether the peer runs as the server's own user (SO_PEERCRED): the server runs commands as itself, so it
    takes them from no one else, whatever the socket's permissions."""
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", credentials)
    if uid != os.getuid():
        print(f"normbench warm: refused a request from pid {pid}, user {uid} (this server runs as {os.getuid()})",
              file=sys.stderr, flush=True)
        return False
    return True


def _read_request(connection: socket.socket) -> tuple[dict, list[int]] | None:
    """The request and its three stream descriptors; None (and a line in the server's log) for a malformed one:
    too long, not JSON of the expected shape, or without the descriptors."""
    message, fds, flags, _ = socket.recv_fds(connection, MAX_REQUEST_BYTES, 3)
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ValueError(f"longer than {MAX_REQUEST_BYTES} bytes, or too many descriptors")
        request = json.loads(message)
        if not (isinstance(request, dict) and isinstance(request.get("argv"), list)
                and all(isinstance(word, str) for word in request["argv"]) and isinstance(request.get("cwd"), str)
                and isinstance(request.get("env"), dict) and len(fds) == 3
                and all(isinstance(k, str) and isinstance(v, str) for k, v in request["env"].items())
                and os.path.isdir(request["cwd"])):
            raise ValueError("expected {argv: [str], cwd: an existing folder, env: {str: str}} and the three "
                             "standard streams")
    except ValueError as error:
        print(f"normbench warm: refused a malformed request: {error}", file=sys.stderr, flush=True)
        for fd in fds:
            os.close(fd)
        return None
    return request, fds


def _run_child(connection: socket.socket, run: Callable[[list[str]], None]) -> None:
    """Become the client's command: its streams, folder and environment; then send back the exit code."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # a multi-worker cell waits for its own children
    os.setsid()  # one process group with any workers it starts, ended together if the client goes
    message = connection.recv(1, socket.MSG_PEEK)
    if not message:  # a connection that only checked the server is up
        os._exit(0)
    read = _read_request(connection)
    if read is None:
        connection.send(bytes([2]))
        os._exit(2)
    request, fds = read
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.pop(SOCKET_ENV, None)  # this process runs the command itself
    finished = threading.Event()
    threading.Thread(target=_end_when_client_goes, args=(connection, finished), daemon=True).start()
    code = 0
    try:
        run(request["argv"])
    except SystemExit as exit_:
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
        code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
    except BaseException:  # noqa: BLE001  report it as the process would, then exit non-zero
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    finished.set()  # from here on the client closing is the normal end, not a cancellation
    connection.send(bytes([code & 0xFF]))
    os._exit(code)


def _end_when_client_goes(connection: socket.socket, finished: threading.Event) -> None:
    """The client sends nothing more; an empty read before the command finished means its job was cancelled."""
    connection.recv(1)
    if not finished.is_set():
        os.killpg(0, signal.SIGTERM)


def start_server(path: str | Path, log: str | Path, wait_s: float = 30.0) -> subprocess.Popen | None:
    """Start a server on `path` as a child of this process (it ends when this process does) and wait until it
    accepts; None where it could not start (commands then run in their own processes)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as log_file:
        server = subprocess.Popen([sys.executable, "-m", "normbench.cli", "warm", "--socket", str(path)],
                                  stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and server.poll() is None:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(str(path))
        except OSError:
            time.sleep(0.1)
            continue
        finally:
            probe.close()
        return server
    server.kill()
    return None
