"""A real HTTP server for download tests: serves bytes from memory on 127.0.0.1 with Range support,
counts requests per path (and records their query strings), and misbehaves on request: drop the
connection mid-body, answer 503/429 (any status) a few times (`"429@<Retry-After value>"` sets the
header, default 0), ignore Range, serve corrupted bytes once, demand basic auth. It also answers the few
Hugging Face hub endpoints `HfFileSystem` uses (revision info, paths-info, tree, resolve)."""
from __future__ import annotations

import base64
import collections
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

HF_SHA = "0" * 40


class Origin:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, list[str]] = collections.defaultdict(list)
        """Per path, actions taken by the next requests, one each: 503, 429, drop, corrupt, ignore_range."""
        self.always: dict[str, set[str]] = collections.defaultdict(set)
        self.auth: dict[str, str] = {}
        self.gets: collections.Counter = collections.Counter()
        self.ranges: dict[str, list[str | None]] = collections.defaultdict(list)
        self.queries: dict[str, list[str]] = collections.defaultdict(list)
        self.hf: dict[str, dict[str, bytes]] = {}
        """HF dataset repo id -> {path in repo: bytes}."""
        self._lock = threading.Lock()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                origin._serve(self, head=True)

            def do_GET(self) -> None:
                origin._serve(self, head=False)

            def do_POST(self) -> None:
                origin._hf_post(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(self, path: str, data: bytes) -> str:
        self.files[path] = data
        return f"{self.url}{path}"

    # ------------------------------------------------------------------ plain files

    def _send(self, h: BaseHTTPRequestHandler, code: int, body: bytes = b"",
              headers: dict[str, str] | None = None, head: bool = False) -> None:
        h.send_response(code)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _serve(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        if path.startswith(("/api/", "/datasets/")):
            return self._hf_get(h, path, head)
        with self._lock:
            if not head:
                self.gets[path] += 1
                self.ranges[path].append(h.headers.get("Range"))
                self.queries[path].append(urlsplit(h.path).query)
            action = self.faults[path].pop(0) if self.faults[path] and not head else None
        if path in self.auth:
            given = h.headers.get("Authorization", "")
            if given != "Basic " + base64.b64encode(self.auth[path].encode()).decode():
                return self._send(h, 401, b"auth required", head=head)
        if path not in self.files:
            return self._send(h, 404, b"not found", head=head)
        code, _, retry_after = (action or "").partition("@")
        if code.isdigit():  # "503", "429", "500@7", ...
            return self._send(h, int(code), b"busy", {"Retry-After": retry_after or "0"}, head=head)
        data = self.files[path]
        if action == "corrupt" or "corrupt" in self.always[path]:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        m = re.match(r"bytes=(\d+)-$", h.headers.get("Range", ""))
        ignore = action == "ignore_range" or "ignore_range" in self.always[path]
        if m and not ignore:
            start = int(m.group(1))
            if start >= len(data):
                return self._send(h, 416, b"", {"Content-Range": f"bytes */{len(data)}"}, head=head)
        body = data[start:]
        h.send_response(206 if start else 200)
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if head:
            return
        if action == "drop":  # half the body, then the connection goes away
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)
            return
        h.wfile.write(body)

    # ------------------------------------------------------------------ the HF hub file API

    def _hf_files(self, h: BaseHTTPRequestHandler, repo: str) -> dict[str, bytes] | None:
        files = self.hf.get(repo)
        if files is None:
            self._send(h, 404, json.dumps({"error": "Repository not found"}).encode(),
                       {"Content-Type": "application/json", "X-Error-Code": "RepoNotFound"})
        return files

    @staticmethod
    def _entry(path: str, data: bytes | None) -> dict:
        if data is None:
            return {"type": "directory", "path": path, "oid": HF_SHA}
        return {"type": "file", "path": path, "size": len(data),
                "oid": hashlib.sha1(data).hexdigest()}

    def _json(self, h: BaseHTTPRequestHandler, obj: object) -> None:
        self._send(h, 200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _hf_get(self, h: BaseHTTPRequestHandler, path: str, head: bool) -> None:
        m = re.match(r"^/api/datasets/([^/]+/[^/]+)(?:/revision/([^/]+))?$", path)
        if m and (files := self._hf_files(h, m.group(1))) is not None:
            return self._json(h, {"id": m.group(1), "sha": HF_SHA,
                                  "siblings": [{"rfilename": p} for p in sorted(files)]})
        m = re.match(r"^/api/datasets/([^/]+/[^/]+)/tree/([^/]+)/?(.*)$", path)
        if m and (files := self._hf_files(h, m.group(1))) is not None:
            base = m.group(3).strip("/")
            recursive = "recursive=true" in (urlsplit(h.path).query or "").lower()
            out, dirs = [], set()
            for p in sorted(files):
                if base and not p.startswith(base + "/"):
                    continue
                rest = p[len(base) + 1:] if base else p
                if "/" in rest and not recursive:
                    d = (base + "/" if base else "") + rest.split("/", 1)[0]
                    if d not in dirs:
                        dirs.add(d)
                        out.append(self._entry(d, None))
                    continue
                if recursive:
                    parts = rest.split("/")[:-1]
                    for i in range(1, len(parts) + 1):
                        d = "/".join(([base] if base else []) + parts[:i])
                        if d not in dirs:
                            dirs.add(d)
                            out.append(self._entry(d, None))
                out.append(self._entry(p, files[p]))
            return self._json(h, out)
        m = re.match(r"^/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m and (files := self._hf_files(h, m.group(1))) is not None:
            with self._lock:
                if not head:
                    self.gets[path] += 1
                    self.ranges[path].append(h.headers.get("Range"))
            data = files.get(m.group(3))
            if data is None:
                return self._send(h, 404, b"", {"X-Error-Code": "EntryNotFound"}, head=head)
            start = 0
            rm = re.match(r"bytes=(\d+)-(\d*)$", h.headers.get("Range", ""))
            end = len(data)
            if rm:
                start = int(rm.group(1))
                end = int(rm.group(2)) + 1 if rm.group(2) else len(data)
            body = data[start:end]
            extra = {"ETag": f'"{hashlib.sha1(data).hexdigest()}"', "X-Repo-Commit": HF_SHA,
                     "Accept-Ranges": "bytes"}
            if rm:
                extra["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            return self._send(h, 206 if rm else 200, body, extra, head=head)
        if not h.wfile.closed and m is None:
            self._send(h, 404, b"", head=head)

    def _hf_post(self, h: BaseHTTPRequestHandler) -> None:
        path = unquote(urlsplit(h.path).path)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length).decode()
        m = re.match(r"^/api/datasets/([^/]+/[^/]+)/paths-info/([^/]+)$", path)
        if not m or (files := self._hf_files(h, m.group(1))) is None:
            return self._send(h, 404, b"")
        try:
            wanted = json.loads(raw).get("paths", [])
        except ValueError:
            from urllib.parse import parse_qs
            wanted = parse_qs(raw).get("paths", [])
        out = []
        for p in wanted:
            p = p.strip("/")
            if p in files:
                out.append(self._entry(p, files[p]))
            elif any(f.startswith(p + "/") for f in files) or p == "":
                out.append(self._entry(p, None))
        self._json(h, out)
