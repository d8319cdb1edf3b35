"""A loopback S3 API server for the benchmarks: moto's server in its own process, with a request count.

    python -m benchmarks.s3_moto --port 5291        # what MotoServer starts (serves until killed)

The server is moto's own WSGI app (what ``moto_server`` runs) behind a thin layer that counts every
request by kind (``list``, ``get``, ``head``, ``put``, ``delete``, ``post``, ``other``) and answers two
paths of its own, which S3 clients never ask for and which are not counted:

- ``GET /_bench/requests[?reset=1]``: the counts (JSON) since the last reset (``/_bench/pid``: the
  server's process id, so a client knows the port is this server's);
- ``POST /_bench/fill`` (JSON body ``{"bucket", "template", "n", "blob"}``, blob in base64): ``n``
  objects put straight into moto's backend, key ``template.format(i=i, i1=i + 1, d=i // 1000)``. The
  benchmark's inputs are not what it measures: this skips one HTTP exchange and its signature check
  per object, which at 22-35 ms an object under load made a bucket of 3x10^4 objects take longer
  than its measurement.

Its own process, so the server's CPU never shares a GIL or a ``/usr/bin/time`` figure with the
measured ``mpemd`` process. ``MotoServer`` starts it, waits for it, and stops it. With
``MPEMD_BENCH_S3_LOG=<file>`` in its environment the server also appends a line per request (time,
method, path and query, Range header) to that file. ``MPEMD_BENCH_S3_PORTS=5321-5329`` picks another
port range than 5291-5299 (a shared machine: each user has a range).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _ports(default: range = range(5291, 5300)) -> range:
    """This benchmark's ports: ``MPEMD_BENCH_S3_PORTS=<first>-<last>`` or 5291-5299 (shared machine:
    each user has a range)."""
    spec = os.environ.get("MPEMD_BENCH_S3_PORTS")
    if not spec:
        return default
    first, _, last = spec.partition("-")
    return range(int(first), int(last or first) + 1)


PORTS = _ports()
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def request_kind(method: str, query: str) -> str:
    """The S3 operation a request is, as far as the benchmark cares: a listing page is a GET with
    ``list-type`` (v2) or on a bucket without a key; everything else by its method."""
    if method == "GET" and ("list-type=" in query or "prefix=" in query or "delimiter=" in query):
        return "list"
    return {"GET": "get", "HEAD": "head", "PUT": "put", "DELETE": "delete", "POST": "post"}.get(method, "other")


class CountingApp:
    """Moto's WSGI app with a request count and the two ``/_bench/`` paths (see the module doc)."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        log = os.environ.get("MPEMD_BENCH_S3_LOG")  # a file to append each request to (profiling only)
        self.log = open(log, "a") if log else None  # noqa: SIM115 (open for the server's lifetime)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path, method = environ.get("PATH_INFO", ""), environ["REQUEST_METHOD"]
        if path == "/_bench/pid":  # which server answers: a port another server holds is not ours
            return _reply(start_response, str(os.getpid()).encode())
        if path == "/_bench/requests":
            with self.lock:
                body = json.dumps(dict(self.counts)).encode()
                if "reset=1" in environ.get("QUERY_STRING", ""):
                    self.counts.clear()
            return _reply(start_response, body)
        if path == "/_bench/fill" and method == "POST":
            spec = json.loads(environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)))
            return _reply(start_response, json.dumps({"put": fill(**spec)}).encode())
        with self.lock:
            self.counts[request_kind(method, environ.get("QUERY_STRING", ""))] += 1
            if self.log:  # which object each request was for: to see where a client's requests go
                self.log.write(f"{time.time():.3f} {method} {path}?{environ.get('QUERY_STRING', '')} "
                               f"{environ.get('HTTP_RANGE', '')}\n")
                self.log.flush()
        return self.app(environ, start_response)


def _reply(start_response: Callable[..., Any], body: bytes) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def fill(bucket: str, template: str, n: int, blob: str) -> int:
    """Put ``n`` objects of the same bytes into moto's backend (in the server process), making the
    bucket if it is not there."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    if bucket not in backend.buckets:
        backend.create_bucket(bucket, CREDENTIALS["AWS_DEFAULT_REGION"])
    data = base64.b64decode(blob)
    for i in range(n):
        backend.put_object(bucket, template.format(i=i, i1=i + 1, d=i // 1000), data)
    return n


def serve(host: str, port: int) -> None:
    import logging

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a log line per request costs the server CPU
    app = CountingApp(DomainDispatcherApplication(create_backend_app))
    make_server(host, port, app, threaded=True, request_handler=MotoRequestHandler).serve_forever()


def _die_with_parent() -> None:
    """In the child before exec: a killed benchmark does not leave its server running (Linux)."""
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class MotoServer:
    """``python -m benchmarks.s3_moto`` on 127.0.0.1 at the first free port of ``ports``; a context
    manager. ``env`` holds what a client needs (endpoint and dummy credentials)."""

    def __init__(self, ports: Iterable[int] = PORTS) -> None:
        self.ports = list(ports)
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""

    def __enter__(self) -> MotoServer:
        for port in self.ports:
            proc = subprocess.Popen([sys.executable, "-m", "benchmarks.s3_moto", "--port", str(port)], cwd=ROOT,
                                    env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
            self.endpoint = f"http://127.0.0.1:{port}"
            if self._wait(proc):
                self.proc = proc
                return self
        raise RuntimeError(f"no moto server could start on ports {self.ports[0]}-{self.ports[-1]}")

    def _wait(self, proc: subprocess.Popen, timeout_s: float = 60) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:  # the port was taken (or the import failed): try the next one
                return False
            try:
                return self._call("/_bench/pid") == proc.pid or self._give_up(proc)
            except OSError:
                time.sleep(0.2)
        proc.kill()
        proc.wait()
        return False

    @staticmethod
    def _give_up(proc: subprocess.Popen) -> bool:
        proc.kill()
        proc.wait()
        return False

    def __exit__(self, *exc: object) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, **CREDENTIALS}

    @contextmanager
    def in_environment(self) -> Iterator[MotoServer]:
        """This server's endpoint and credentials in ``os.environ`` (children inherit them), the old
        values put back after: a caller in a test process must not leave its later tests this endpoint."""
        saved = {key: os.environ.get(key) for key in self.env}
        os.environ.update(self.env)
        try:
            yield self
        finally:
            restore_environment(saved)

    def _call(self, path: str, body: dict | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        with urllib.request.urlopen(f"{self.endpoint}{path}", data=data, timeout=3600) as reply:
            return json.loads(reply.read() or b"null")

    def requests(self, reset: bool = False) -> dict[str, int]:
        """The requests by kind since the last reset (and reset the count when asked)."""
        return self._call(f"/_bench/requests{'?reset=1' if reset else ''}")

    def fill(self, bucket: str, template: str, n: int, blob: bytes) -> int:
        """``n`` objects of ``blob`` under ``template`` (``{i}``, ``{i1}``, ``{d}``), straight into the server."""
        return self._call("/_bench/fill", {"bucket": bucket, "template": template, "n": n,
                                           "blob": base64.b64encode(blob).decode()})["put"]

    def reset(self) -> None:
        """Every bucket and object gone (moto's own reset), and the count zeroed."""
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST"),
                               timeout=600).read()
        self.requests(reset=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    serve(args.host, args.port)


def restore_environment(saved: dict[str, str | None]) -> None:
    """Put ``saved`` values back into ``os.environ`` (None: the variable was not set)."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
