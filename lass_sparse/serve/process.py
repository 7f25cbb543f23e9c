"""Run ``lass-sparse serve`` as a child process (tests, the load benchmark): start it on a free
port of 127.0.0.1, wait for its ready line, read its memory, stop it with a signal."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

READY = re.compile(r"^lass-sparse serve: listening on (http://\S+)")


class ServerProcess:
    """``ServerProcess(["--run", RUN, ...]).start()`` runs ``python -m lass_sparse.cli serve
    --port 0 ...`` (``--host 127.0.0.1`` unless given); :meth:`wait_ready` returns its URL.
    stdout/stderr are collected in :attr:`output` (for failure messages)."""

    def __init__(self, args: Sequence[str], *, threads: int = 1, cwd: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.args = list(args)
        self.threads = threads
        self.cwd = cwd
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.output: list[str] = []
        self._ready = threading.Event()

    def start(self) -> ServerProcess:
        args = list(self.args)
        if "--port" not in args:
            args += ["--port", "0"]
        if "--host" not in args:
            args += ["--host", "127.0.0.1"]
        if "--threads" not in args:
            args += ["--threads", str(self.threads)]
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("OMP_NUM_THREADS", str(self.threads))
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lass_sparse.cli", "serve", *args], cwd=self.cwd, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            m = READY.match(line)
            if m and not self._ready.is_set():
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()  # exited: wake the waiter

    def wait_ready(self, timeout: float = 120.0) -> str:
        """The server's URL once it listens; RuntimeError (with its output) if it exits or
        takes longer than ``timeout`` seconds."""
        if self.proc is None:
            self.start()
        self._ready.wait(timeout)
        if self.url is None:
            rc = None if self.proc is None else self.proc.poll()
            self.stop(signal.SIGKILL)
            raise RuntimeError(f"lass-sparse serve did not start (exit code {rc}):\n"
                               + "".join(self.output[-40:]))
        return self.url

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux ``/proc``)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("VmRSS not found")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Send ``sig`` and wait for the exit code (SIGKILL after ``timeout`` seconds)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> ServerProcess:
        self.start()
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_all(servers: Sequence[ServerProcess], timeout: float = 120.0) -> list[str]:
    """Start every server that is not started yet, then wait for all (they load in parallel)."""
    for s in servers:
        if s.proc is None:
            s.start()
    deadline = time.monotonic() + timeout
    return [s.wait_ready(max(1.0, deadline - time.monotonic())) for s in servers]
