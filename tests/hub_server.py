"""A small stand-in for the Hub's file endpoints on 127.0.0.1, so the real ``huggingface_hub`` code runs.

Serves ``/{repo}/resolve/{revision}/{path}`` (HEAD and GET, with the ``X-Repo-Commit`` and ``ETag``
headers ``hf_hub_download`` reads, and ``X-Error-Code`` on 404s as the Hub sends them) and
``/api/models/{repo}[/revision/{revision}]`` (the file list). The Hub's write API is not served:
:func:`recording_api` stands in for ``HfApi`` in push tests.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

from huggingface_hub import CommitInfo, constants

from share_diffusers import hub as hub_module


class FakeHub:
    def __init__(self, port: int):
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}  # repo -> revision -> path -> content
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._serve(self, body=False)

            def do_GET(self):
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_folder(self, repo_id: str, folder: Path, revision: str = "main", prefix: str = "") -> None:
        files = self.repos.setdefault(repo_id, {}).setdefault(revision, {})
        for path in Path(folder).rglob("*"):
            if path.is_file():
                files[prefix + path.relative_to(folder).as_posix()] = path.read_bytes()

    @staticmethod
    def commit(repo_id: str, revision: str) -> str:
        return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()

    def _serve(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append(f"{handler.command} {path}")
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"]:
            repo_id = "/".join(parts[2:4])
            revision = parts[5] if len(parts) > 5 and parts[4] == "revision" else "main"
            files = self._files(handler, repo_id, revision)
            if files is not None:
                data = json.dumps(
                    {
                        "id": repo_id,
                        "sha": self.commit(repo_id, revision),
                        "siblings": [{"rfilename": name} for name in sorted(files)],
                    }
                ).encode()
                self._send(handler, 200, data, body, {"Content-Type": "application/json"})
            return
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            # resolve/<commit>/... serves the branch whose commit that is
            branches = {self.commit(repo_id, branch): branch for branch in self.repos.get(repo_id, {})}
            revision = branches.get(revision, revision)
            files = self._files(handler, repo_id, revision)
            if files is None:
                return
            if filename not in files:
                # As the Hub does: the commit comes with the 404, so huggingface_hub notes the absence in the cache.
                headers = {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"}
                self._send(handler, 404, b"", body, {**headers, "X-Repo-Commit": self.commit(repo_id, revision)})
                return
            data = files[filename]
            headers = {
                "X-Repo-Commit": self.commit(repo_id, revision),
                "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                "Content-Type": "application/octet-stream",
            }
            self._send(handler, 200, data, body, headers)
            return
        self._send(handler, 404, b"", body, {})

    def _files(self, handler, repo_id: str, revision: str):
        if repo_id not in self.repos:
            self._send(
                handler, 401, b"", True, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}
            )
            return None
        if revision not in self.repos[repo_id]:
            self._send(
                handler, 404, b"", True, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}
            )
            return None
        return self.repos[repo_id][revision]

    @staticmethod
    def _send(handler, status: int, data: bytes, body: bool, headers: dict) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body and data:
            handler.wfile.write(data)


def recording_api(monkeypatch, upload_to):
    """``HfApi`` replaced by one that records its calls (name, keyword arguments) and copies the uploaded folder
    to ``upload_to``; returns the list of calls."""
    calls = []

    class RecordingApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, **kwargs):
            calls.append(("create_repo", kwargs))

        def create_branch(self, repo_id, **kwargs):
            calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))
            shutil.copytree(kwargs["folder_path"], upload_to)
            url = f"{constants.ENDPOINT}/{kwargs['repo_id']}"
            pr_url = f"{url}/discussions/7" if kwargs.get("create_pr") else None
            return CommitInfo(f"{url}/commit/{'0' * 40}", kwargs["commit_message"], "", "0" * 40, pr_url=pr_url)

    monkeypatch.setattr(hub_module, "HfApi", RecordingApi)
    return calls
