"""A Hugging Face Hub on 127.0.0.1, for testing downloads without the internet (HF_ENDPOINT points here).

It serves the routes and headers huggingface_hub 2.x uses (read from its hf_api.py model_info and
file_download.py get_hf_file_metadata / http_get):
- GET /api/models/{repo}[/revision/{rev}]?blobs=true: the repo's commit (`sha`) and `siblings`, each
  with its size and, for large files, `lfs` {size, sha256};
- HEAD/GET /{repo}/resolve/{rev}/{file}: a small file answers itself (ETag: its git blob id,
  X-Repo-Commit, Content-Length); a large (LFS) one redirects (302) to a CDN on another origin,
  carrying X-Linked-Etag (its SHA-256), X-Linked-Size and X-Repo-Commit;
- GET {cdn}/{sha256}: the blob, with Range requests (206, Content-Range): how a cut-off transfer is
  resumed, and how a GGUF's header is read before the file is downloaded;
- the hub's errors: an unknown or private repo 401 (anonymous) or 404 with X-Error-Code RepoNotFound,
  a gated repo's files 401/403 with GatedRepo, an unknown revision 404 with RevisionNotFound.

`cut[name] = n` makes the next transfer of a file stop after n bytes (the connection drops), once;
`cut_always[name] = n` every time.
`requests` records (method, path, Range header) of every request.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

GRANTED_TOKEN = "hf_granted"  # reads every repo, gated or private
LFS_SUFFIXES = (".safetensors", ".gguf")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    gated: bool = False
    private: bool = False
    gguf_architecture: str | None = None
    branches: dict[str, str] = field(default_factory=dict)  # branch or tag → commit (any commit serves the files)

    def __post_init__(self):
        digest = hashlib.sha1()
        for name in sorted(self.files):
            digest.update(name.encode() + git_blob_id(self.files[name]).encode())
        self.commit = digest.hexdigest()
        self.branches.setdefault("main", self.commit)

    @classmethod
    def from_dir(cls, directory: Path, **kwargs) -> "FakeRepo":
        return cls({str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()},
                   **kwargs)

    def is_lfs(self, name: str) -> bool:
        return name.endswith(LFS_SUFFIXES)


class FakeHub:
    def __init__(self, repos: dict[str, FakeRepo] | None = None):
        self.repos = dict(repos or {})
        self.cut: dict[str, int] = {}  # file name → bytes sent before the connection drops, once
        self.cut_always: dict[str, int] = {}  # … every time
        self.requests: list[tuple[str, str, str | None]] = []
        self._blobs: dict[str, bytes] = {}  # sha256 → data, of the LFS files resolved so far
        self._blob_names: dict[str, str] = {}  # sha256 → file name (what `cut` is keyed by)
        self._servers = [ThreadingHTTPServer(("127.0.0.1", 0), self._handler(cdn)) for cdn in (False, True)]
        for server in self._servers:
            server.daemon_threads = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    def __enter__(self) -> "FakeHub":
        for server in self._servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def downloads(self, suffix: str = "") -> list[tuple[str, str, str | None]]:
        """The GETs of files (not the API), those whose path ends with `suffix`."""
        return [r for r in self.requests if r[0] == "GET" and not r[1].startswith("/api/") and r[1].endswith(suffix)]

    # --- the routes ---------------------------------------------------------------------------------

    def _access(self, repo_id: str, token: str | None, files: bool):
        """(repo, None) or (None, (status, error code)) as the hub answers."""
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and token != GRANTED_TOKEN):
            return None, (404 if token else 401, "RepoNotFound")
        if files and repo.gated and token != GRANTED_TOKEN:
            return None, (403 if token else 401, "GatedRepo")
        return repo, None

    def _handler(self, cdn: bool):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._route(body=False)

            def do_GET(self):
                self._route(body=True)

            def _route(self, body: bool):
                path = urlparse(self.path).path
                hub.requests.append((self.command, path, self.headers.get("Range")))
                auth = self.headers.get("Authorization", "")
                token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
                if cdn:
                    return self._blob(path.strip("/"), body)
                if path.startswith("/api/models/"):
                    return self._model_info(path[len("/api/models/"):], token)
                parts = path.strip("/").split("/")
                if len(parts) >= 5 and parts[2] == "resolve":
                    return self._resolve("/".join(parts[:2]), unquote(parts[3]), unquote("/".join(parts[4:])), token,
                                         body)
                self._error(404, None)

            def _error(self, status: int, code: str | None, commit: str | None = None):
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                    self.send_header("X-Error-Message", code)
                if commit:
                    self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _commit(self, repo: FakeRepo, revision: str) -> str | None:
                if revision in repo.branches:
                    return repo.branches[revision]
                return revision if revision == repo.commit or revision in repo.branches.values() else None

            def _model_info(self, rest: str, token):
                repo_id, _, revision = rest.partition("/revision/")
                repo, error = hub._access(repo_id, token, files=False)
                if error:
                    return self._error(*error)
                commit = self._commit(repo, unquote(revision) if revision else "main")
                if commit is None:
                    return self._error(404, "RevisionNotFound")
                siblings = []
                for name, data in sorted(repo.files.items()):
                    entry = {"rfilename": name, "size": len(data), "blobId": git_blob_id(data)}
                    if repo.is_lfs(name):
                        entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
                    siblings.append(entry)
                info = {"id": repo_id, "sha": commit, "private": repo.private, "gated": "manual" if repo.gated else False,
                        "siblings": siblings}
                if repo.gguf_architecture:
                    info["gguf"] = {"architecture": repo.gguf_architecture}
                data = json.dumps(info).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _resolve(self, repo_id: str, revision: str, name: str, token, body: bool):
                repo, error = hub._access(repo_id, token, files=True)
                if error:
                    return self._error(*error)
                commit = self._commit(repo, revision)
                if commit is None:
                    return self._error(404, "RevisionNotFound")
                if name not in repo.files:
                    return self._error(404, "EntryNotFound", commit)
                data = repo.files[name]
                if repo.is_lfs(name):
                    sha = hashlib.sha256(data).hexdigest()
                    hub._blobs[sha] = data
                    hub._blob_names[sha] = name
                    self.send_response(302)
                    self.send_header("Location", f"{hub.cdn_url}/{sha}")
                    self.send_header("ETag", f'"{git_blob_id(b"pointer " + sha.encode())}"')
                    self.send_header("X-Linked-Etag", f'"{sha}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                    self.send_header("X-Repo-Commit", commit)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("ETag", f'"{git_blob_id(data)}"')
                self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _blob(self, sha: str, body: bool):
                data = hub._blobs.get(sha)
                if data is None:
                    return self._error(404, None)
                start, end = 0, len(data) - 1
                ranged = self.headers.get("Range")
                if ranged and ranged.startswith("bytes="):
                    first, _, last = ranged[len("bytes="):].partition("-")
                    start, end = int(first), min(int(last), end) if last else end
                part = data[start:end + 1]
                self.send_response(206 if ranged else 200)
                if ranged:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                if not body:
                    return
                name = hub._blob_names.get(sha)
                cut = hub.cut.pop(name, hub.cut_always.get(name))
                if cut is not None and cut < len(part):
                    self.wfile.write(part[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # the transfer drops mid-file
                    return
                self.wfile.write(part)

        return Handler
