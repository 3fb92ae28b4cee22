"""A real `jaxengine serve` subprocess for tests: started on the tiny checkpoint (or any
model), its stdout / stderr read line by line on threads, waited on until ready. The HTTP
API is off unless `http=True`, which serves it on a free port (`http_port`): `--http-port 0`
turns it off, so the port is picked here."""

from __future__ import annotations

import queue
import re
import socket
import subprocess
import sys
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.serving.tiny_model import ENGINE_ARGS

READY = re.compile(r"serving .* on grpc://127\.0\.0\.1:(\d+)")
HTTP_READY = re.compile(r"serving .* \(OpenAI API\) on http://127\.0\.0\.1:(\d+)/v1")
METRICS = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")
ENGINE_PID = re.compile(r"engine process pid (\d+)")
FRONTEND_PIDS = re.compile(r"front-end process pids ([\d, ]+)")


def engine_flags(**overrides) -> list[str]:
    args = []
    for k, v in (ENGINE_ARGS | overrides).items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def free_port() -> int:
    """A port nothing listens on now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    def __init__(self, *args: str, model: str | None = None, engine: bool = True, http: bool = False,
                 **engine_overrides):
        self.http_port = free_port() if http else None
        cmd = [sys.executable, "-m", "serving.cli", "serve", "--port", "0", "--quiet",
               "--http-port", str(self.http_port or 0), *args]
        if model is not None:
            cmd += ["--model", model]
        if engine:
            cmd += engine_flags(**engine_overrides)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self._lines: queue.Queue = queue.Queue()
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._read, args=(stream, sink), daemon=True).start()
        self.port: int | None = None

    def _read(self, stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)
            self._lines.put(line)

    def wait_for(self, pattern: re.Pattern, timeout: float = 240.0) -> re.Match:
        """The first line (stdout or stderr) matching `pattern`, among those read so far or to come."""
        deadline = time.monotonic() + timeout
        for line in list(self.out) + list(self.err):
            if m := pattern.search(line):
                return m
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None and self._lines.empty():
                    break
                continue
            if m := pattern.search(line):
                return m
        raise AssertionError(f"no line matching {pattern.pattern!r} (exit code {self.proc.poll()}):\n{self.log}")

    def wait_ready(self, timeout: float = 240.0) -> int:
        self.port = int(self.wait_for(READY, timeout).group(1))
        if self.http_port is not None:
            assert int(self.wait_for(HTTP_READY, 5).group(1)) == self.http_port, self.log
        return self.port

    @property
    def base_url(self) -> str:
        """The OpenAI API's base URL (with http=True)."""
        return f"http://127.0.0.1:{self.http_port}/v1"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return "".join(self.out) + "".join(self.err)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class HealthPoller:
    """Checks a server's health every `interval` seconds on a thread of its own; `seen` holds
    each answer's status name, or the code of the call that failed (the port closed)."""

    def __init__(self, address: str, interval: float = 0.02):
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._channel = grpc.insecure_channel(address)
        self._stub = health_pb2_grpc.HealthStub(self._channel)
        self._interval = interval
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status = self._stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                self.seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
            except grpc.RpcError as e:
                self.seen.append(e.code().name)
            time.sleep(self._interval)

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(10)
        self._channel.close()
        return self.seen
