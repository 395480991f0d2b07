"""A minimal Hugging Face Hub-compatible HTTP server on 127.0.0.1 for offline tests.

Serves model and dataset repos from local folders (download: resolve, repo info, tree) and accepts uploads
(create repo, preupload, ndjson commit) into memory-backed folders. Only what huggingface_hub's client
calls for from_pretrained / snapshot_download / upload_folder and what ``datasets.load_dataset`` calls for a
parquet dataset repo (README.md configs, tree listing, resolve) is implemented.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0" * 40


class HubState:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        self.unauthorized = False  # answer every write with 401, as the Hub does for a bad token

    def repo_dir(self, repo: str, kind: str = "model") -> Path:
        return self.root / repo if kind == "model" else self.root / "_datasets" / repo


def _handler(state: HubState):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, code: int, obj, head: bool = False):
            self._send(code, json.dumps(obj).encode(), {"Content-Type": "application/json"}, head)

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _resolve(self, head: bool):
            m = re.match(r"^/(models/|datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", self.path.split("?")[0])
            if not m:
                return False
            kind, repo, _rev, path = m.groups()
            f = state.repo_dir(repo, "dataset" if kind == "datasets/" else "model") / path
            if not f.is_file():
                self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, head)
                return True
            data = f.read_bytes()
            etag = '"' + hashlib.sha256(data).hexdigest() + '"'
            self._send(200, data, {"X-Repo-Commit": COMMIT, "ETag": etag, "Content-Type": "application/octet-stream"},
                       head)
            return True

        def do_HEAD(self):
            state.requests.append("HEAD " + self.path)
            if not self._resolve(head=True):
                self._send(404, b"", head=True)

        def do_GET(self):
            state.requests.append("GET " + self.path)
            if self._resolve(head=False):
                return
            path = self.path.split("?")[0]
            m = re.match(r"^/api/(models|datasets)/([^/]+/[^/]+)(?:/revision/[^/]+)?$", path)
            if m:
                d = state.repo_dir(m.group(2), m.group(1)[:-1])
                if not d.is_dir():
                    return self._json(404, {"error": "Repository not found"})
                files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
                return self._json(200, {"id": m.group(2), "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]})
            m = re.match(r"^/api/(models|datasets)/([^/]+/[^/]+)/tree/[^/]+/?(.*)$", path)
            if m:
                d = state.repo_dir(m.group(2), m.group(1)[:-1])
                base, entries = d / m.group(3), []
                for p in sorted(base.iterdir()) if base.is_dir() else []:
                    rel = str(p.relative_to(d))
                    entries.append({"type": "directory", "path": rel, "oid": COMMIT} if p.is_dir() else
                                   {"type": "file", "path": rel, "size": p.stat().st_size, "oid": COMMIT})
                return self._json(200, entries)
            self._json(404, {"error": "not found"})

        def do_POST(self):
            state.requests.append("POST " + self.path)
            path = self.path.split("?")[0]
            body = self._body()
            if state.unauthorized:
                return self._json(401, {"error": "Invalid username or password."})
            if path == "/api/validate-yaml":  # model-card metadata check done by upload of README.md
                return self._json(200, {})
            if path == "/api/repos/create":
                req = json.loads(body)
                repo = f"{req.get('organization') or 'user'}/{req['name']}"
                d = state.repo_dir(repo)
                if d.exists():
                    return self._json(409, {"error": "exists", "url": f"http://{self.headers['Host']}/{repo}"})
                d.mkdir(parents=True)
                return self._json(200, {"url": f"http://{self.headers['Host']}/{repo}"})
            m = re.match(r"^/api/models/([^/]+/[^/]+)/preupload/.+$", path)
            if m:
                req = json.loads(body)
                return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in req["files"]]})
            m = re.match(r"^/api/models/([^/]+/[^/]+)/commit/.+$", path)
            if m:
                d = state.repo_dir(m.group(1))
                d.mkdir(parents=True, exist_ok=True)
                for line in body.decode().splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    if item.get("key") == "file":
                        v = item["value"]
                        target = d / v["path"]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(base64.b64decode(v["content"]))
                    elif item.get("key") == "deletedFile":
                        (d / item["value"]["path"]).unlink(missing_ok=True)
                return self._json(200, {"commitUrl": f"http://{self.headers['Host']}/{m.group(1)}/commit/{COMMIT}", "commitOid": COMMIT})
            self._json(404, {"error": "not found"})

    return Handler


class LocalHub:
    """Context manager running the server in a thread; ``url`` is its endpoint."""

    def __init__(self, root: Path) -> None:
        self.state = HubState(Path(root))

    def add_repo(self, repo: str, folder: Path) -> None:
        shutil.copytree(folder, self.state.repo_dir(repo))

    def add_dataset(self, repo: str, folder: Path) -> None:
        """Serve ``folder`` (a README.md with ``configs:`` and parquet files) as dataset repo ``repo``."""
        shutil.copytree(folder, self.state.repo_dir(repo, "dataset"))

    def __enter__(self) -> "LocalHub":
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
