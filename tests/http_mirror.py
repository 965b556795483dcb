"""A MedMNIST+ mirror on 127.0.0.1 for the download tests: serves bytes with HTTP Range and scripted faults.

Modes per file: ``ok``; ``drop_once`` (the first response stops half-way, later ones are whole);
``truncated`` (every response stops at the file's middle, though Content-Length promises more);
``no_range`` (Range ignored: always the whole file with 200); ``drop_once_no_range``; ``busy_once``
(one HTTP 503 first). Unknown names get 404. Every request is recorded as (name, Range header).
"""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    server: "Mirror"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        name = self.path.split("?", 1)[0].lstrip("/")
        rng = self.headers.get("Range")
        self.server.requests.append((name, rng))
        if name not in self.server.files:
            self.send_error(404, "Not Found")
            return
        body, mode = self.server.files[name]
        first = name not in self.server.seen
        self.server.seen.add(name)
        if mode == "busy_once" and first:
            self.send_error(503, "Service Unavailable")
            return
        start = 0
        if rng and "no_range" not in mode:
            start = int(rng.split("=", 1)[1].split("-", 1)[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        end = len(body)
        if mode == "truncated" or (mode.startswith("drop_once") and first):
            end = max(start, len(body) // 2)
        self.wfile.write(body[start:end])
        self.wfile.flush()

    def log_message(self, *args) -> None:
        pass


class Mirror(ThreadingHTTPServer):
    """``with Mirror({"x.npz": (bytes, "ok")}) as m: m.url`` serves until the block ends."""

    daemon_threads = True

    def __init__(self, files: dict[str, tuple[bytes, str]]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = dict(files)
        self.requests: list[tuple[str, str | None]] = []
        self.seen: set[str] = set()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> "Mirror":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)
