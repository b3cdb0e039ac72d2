"""An in-memory fake of the Hugging Face Hub, for tests that push and pull through the real client.

It answers the endpoints huggingface_hub 2.4.0 calls for repos, commits (regular and LFS files),
branches, refs, tree listings and ``/resolve`` downloads, with the status codes and headers
(``X-Error-Code``, ``X-Repo-Commit``, ``X-Linked-Etag`` ...) that the client turns into its
exception classes and cache entries. Standard library only: one ``ThreadingHTTPServer`` thread on
127.0.0.1, all state in memory behind one lock.

    hub = FakeHub().start()           # or the ``fake_hub`` fixture of tests/hub_fixtures.py
    HfApi(endpoint=hub.url, token=hub.token).upload_folder(...)
    hub.files("user/name")            # {"config.json": b"...", "model.safetensors": b"..."}
    hub.fail(500, path_contains="/commit/")   # the next commit request answers 500
    hub.drop(method="PUT")            # the next upload is cut off without an answer
    hub.stop()

Like the Hub: writes need ``Authorization: Bearer <hub.token>`` (else 401), a request carrying any
other token gets 401, private repos are 404 to requests without the token, and a commit exists
only once its request completed. The LFS upload PUT is the exception to the token rule: the real
client sends no token to the storage URL, so the upload URL handed out by the batch endpoint is
itself the credential (as an S3 presigned URL is).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import secrets
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import Message
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".png")
LFS_THRESHOLD = 1_000_000  # bytes; larger files go LFS whatever their name
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _git_oid(data: bytes) -> str:
    """The git blob id of ``data`` (what the Hub reports as a file's ``oid`` / ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(eq=False)
class _File:
    content: bytes
    lfs: bool

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @cached_property
    def pointer(self) -> bytes:
        """The git-lfs pointer that git stores in place of an LFS file."""
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.content)}\n".encode()

    @cached_property
    def oid(self) -> str:
        return _git_oid(self.pointer if self.lfs else self.content)

    @property
    def etag(self) -> str:
        """What the client compares to skip unchanged files and names cache blobs by."""
        return self.sha256 if self.lfs else self.oid

    def describe(self, path: str, *, lfs_key: str) -> dict:
        """The tree / siblings entry (the two endpoints name the LFS hash differently)."""
        entry: dict = {"type": "file", "path": path, "size": len(self.content), "oid": self.oid}
        if self.lfs:
            entry["lfs"] = {lfs_key: self.sha256, "size": len(self.content), "pointerSize": len(self.pointer)}
        return entry


@dataclass
class _Commit:
    id: str
    parent: str | None
    title: str
    description: str
    date: str
    files: dict[str, _File]


@dataclass
class _Repo:
    id: str
    private: bool
    created: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> object uploaded through the LFS API

    def at(self, revision: str) -> _Commit | None:
        """The commit a branch name or a full commit id points to."""
        return self.commits.get(self.branches.get(revision, revision))


@dataclass
class _Fault:
    status: int | None  # None: drop the connection
    count: int
    method: str | None
    path_contains: str | None

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method.upper() == method) and (
            self.path_contains is None or self.path_contains in path
        )


@dataclass
class _Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class _Refused(Exception):
    """Raised by the repo/revision/permission checks; ``_dispatch`` answers with its ``reply``."""

    def __init__(self, reply: _Reply):
        super().__init__(reply.status)
        self.reply = reply


def _json(obj: object, status: int = 200, headers: dict[str, str] | None = None) -> _Reply:
    return _Reply(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})


def _error(status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None) -> _Reply:
    """An error as the Hub sends it: JSON ``{"error": ...}`` plus the headers the client reads."""
    extra = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}), **(headers or {})}
    return _json({"error": message}, status, extra)


_NO_REPO = "Repository not found"


class FakeHub:
    """An in-memory Hub on 127.0.0.1: start it, point the client at ``url`` with ``token``, inspect it.

    ``token`` is the one valid (write) token; ``user`` the namespace whoami reports and where repos
    created without one go; ``home`` the HF_HOME handed to subprocesses by ``env()`` (a temporary
    folder removed by ``stop()`` when not given).
    """

    def __init__(self, *, token: str | None = None, user: str = "user", home: str | Path | None = None) -> None:
        self.token = token or f"hf_sentinel_{secrets.token_hex(12)}"
        self.user = user
        self._own_home = home is None
        self._home = Path(home) if home is not None else Path(tempfile.mkdtemp(prefix="fake_hub_home_"))
        self._lock = threading.RLock()
        self._repos: dict[str, _Repo] = {}
        self._uploads: dict[str, tuple[str, str, int]] = {}  # upload nonce -> (repo, sha256, size)
        self._faults: list[_Fault] = []
        self._requests: list[tuple[str, str]] = []
        self._ids = itertools.count()
        self._connections: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> FakeHub:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.hub = self  # type: ignore[attr-defined]
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut the client's idle keep-alive connections, remove the temporary home."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            with self._lock:
                for conn in list(self._connections):
                    try:
                        conn.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            self._server = None
        if self._own_home:
            shutil.rmtree(self._home, ignore_errors=True)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def env(self, home: str | Path | None = None) -> dict[str, str]:
        """Environment for a process that should use this hub (subprocesses: merge over os.environ).

        Caches and the login file go under ``home`` (default: this hub's own temporary HF_HOME), so
        a subprocess downloads over HTTP instead of finding the test process's cache.
        """
        home = Path(home) if home is not None else self._home
        return {
            "HF_ENDPOINT": self.url,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "HF_TOKEN": self.token,
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(home / "hub"),
            "HF_TOKEN_PATH": str(home / "token"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    # ---- failure injection --------------------------------------------------------------------

    def fail(self, status: int, *, count: int = 1, method: str | None = None, path_contains: str | None = None) -> None:
        """Answer the next ``count`` matching requests with ``status`` and a JSON error body.

        A request matches when its method equals ``method`` and its URL-decoded path (no query)
        contains ``path_contains``; None matches anything. Rules apply in the order given.
        """
        with self._lock:
            self._faults.append(_Fault(status, count, method, path_contains))

    def drop(self, *, count: int = 1, method: str | None = None, path_contains: str | None = None) -> None:
        """Read the head and part of the body of the next ``count`` matching requests, then close
        the connection without answering (a connection lost mid-upload): the request has no effect."""
        with self._lock:
            self._faults.append(_Fault(None, count, method, path_contains))

    def clear_faults(self) -> None:
        """Forget the failures and drops not used up yet."""
        with self._lock:
            self._faults.clear()

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    fault.count -= 1
                    if fault.count <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    # ---- inspection ---------------------------------------------------------------------------

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, URL-decoded path without query) of every request received, in order."""
        with self._lock:
            return list(self._requests)

    def repos(self) -> list[str]:
        """The ids of all repos, sorted."""
        with self._lock:
            return sorted(self._repos)

    def repo_exists(self, repo_id: str) -> bool:
        with self._lock:
            return repo_id in self._repos

    def is_private(self, repo_id: str) -> bool:
        with self._lock:
            return self._repo(repo_id).private

    def branches(self, repo_id: str) -> dict[str, str]:
        """Branch name -> commit id."""
        with self._lock:
            return dict(self._repo(repo_id).branches)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Path -> content (LFS files resolved) at a branch or commit id."""
        with self._lock:
            return {path: f.content for path, f in self._commit(repo_id, revision).files.items()}

    def commits(self, repo_id: str, revision: str = "main") -> list[dict]:
        """The history of a branch or commit, newest first: ``{"id", "message"}`` each."""
        with self._lock:
            self._commit(repo_id, revision)  # KeyError for an unknown repo or revision
            return [{"id": c.id, "message": c.title} for c in self._history(self._repos[repo_id], revision)]

    def _repo(self, repo_id: str) -> _Repo:
        if repo_id not in self._repos:
            raise KeyError(f"no repo {repo_id!r} on the fake hub (repos: {sorted(self._repos)})")
        return self._repos[repo_id]

    def _commit(self, repo_id: str, revision: str) -> _Commit:
        commit = self._repo(repo_id).at(revision)
        if commit is None:
            raise KeyError(f"no revision {revision!r} in {repo_id!r}")
        return commit

    def _history(self, repo: _Repo, revision: str) -> list[_Commit]:
        commit, history = repo.at(revision), []
        while commit is not None:
            history.append(commit)
            commit = repo.commits.get(commit.parent) if commit.parent else None
        return history

    def _new_commit(self, repo: _Repo, parent: _Commit | None, title: str, description: str,
                    files: dict[str, _File]) -> _Commit:
        seed = f"{repo.id}\n{parent.id if parent else ''}\n{next(self._ids)}\n{title}".encode()
        commit = _Commit(hashlib.sha1(seed).hexdigest(), parent.id if parent else None, title, description,
                         _now(), files)
        repo.commits[commit.id] = commit
        return commit

    # ---- request handling ---------------------------------------------------------------------

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self._requests.append((method, path))

    def _dispatch(self, method: str, raw_path: str, query: dict[str, list[str]], headers: Message,
                  body: bytes) -> _Reply:
        """Route one request; runs under the lock, so each request is atomic."""
        parts = [unquote(p) for p in raw_path.strip("/").split("/")]
        header = headers.get("Authorization")
        auth: bool | None = None if not header else header == f"Bearer {self.token}"
        if parts[:2] == ["__lfs__", "upload"] and method == "PUT":  # no token: the URL is the credential
            return self._lfs_upload(parts[2] if len(parts) > 2 else "", body)
        if auth is False:
            return _error(401, "Invalid credentials in Authorization header")
        with self._lock:
            try:
                return self._route(method, parts, raw_path, query, headers, auth, body)
            except _Refused as refused:  # a missing repo or revision, or no write token
                return refused.reply

    def _route(self, method: str, parts: list[str], raw_path: str, query: dict[str, list[str]], headers: Message,
               auth: bool | None, body: bytes) -> _Reply:
        if parts[0] == "api":
            return self._api(method, parts[1:], query, auth, body)
        if parts[0] == "__lfs__" and parts[1:2] == ["verify"] and method == "POST":
            return self._lfs_verify("/".join(parts[2:4]), auth, body)
        if len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}", auth, body) if method == "POST" else _no_route(method, raw_path)
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), auth, headers.get("Range"))
        return _no_route(method, raw_path)

    def _api(self, method: str, parts: list[str], query: dict[str, list[str]], auth: bool | None, body: bytes) -> _Reply:
        route = (method, *parts[:2])
        if route == ("GET", "whoami-v2"):
            return self._whoami(auth)
        if route == ("POST", "validate-yaml"):
            return _json({})
        if route == ("POST", "repos", "create"):
            return self._create_repo(auth, _load(body))
        if route == ("DELETE", "repos", "delete"):
            return self._delete_repo(auth, _load(body))
        if parts[:1] != ["models"] or len(parts) < 3:
            return _no_route(method, "/api/" + "/".join(parts))
        repo_id, action, rest = f"{parts[1]}/{parts[2]}", parts[3] if len(parts) > 3 else None, parts[4:]

        def flag(name: str) -> bool:
            return query.get(name, [""])[0].lower() in ("1", "true")

        match (method, action):
            case ("GET", None):
                return self._info(repo_id, "main", auth, blobs=flag("blobs"))
            case ("GET", "revision") if rest:
                return self._info(repo_id, rest[0], auth, blobs=flag("blobs"))
            case ("GET", "tree") if rest:
                return self._tree(repo_id, rest[0], "/".join(rest[1:]), auth, recursive=flag("recursive"))
            case ("GET", "refs"):
                return self._refs(repo_id, auth)
            case ("GET", "commits") if rest:
                return self._commits(repo_id, rest[0], auth)
            case ("POST", "preupload") if rest:
                return self._preupload(repo_id, rest[0], auth, _load(body))
            case ("POST", "commit") if rest:
                if flag("create_pr"):
                    return _error(400, "the fake hub does not support pull requests")
                return self._commit_request(repo_id, rest[0], auth, body)
            case ("POST", "branch") if rest:
                return self._create_branch(repo_id, "/".join(rest), auth, _load(body))
            case ("DELETE", "branch") if rest:
                return self._delete_branch(repo_id, "/".join(rest), auth)
            case ("PUT", "settings"):
                return self._settings(repo_id, auth, _load(body))
        return _no_route(method, "/api/" + "/".join(parts))

    # ---- access -------------------------------------------------------------------------------

    def _readable(self, repo_id: str, auth: bool | None) -> _Repo:
        repo = self._repos.get(repo_id)
        if repo is None or (repo.private and not auth):
            raise _Refused(_error(404, _NO_REPO, "RepoNotFound"))
        return repo

    def _writable(self, repo_id: str, auth: bool | None) -> _Repo:
        if not auth:
            raise _Refused(_error(401, "You must be authenticated with a write token to do this"))
        return self._readable(repo_id, auth)

    def _revision(self, repo: _Repo, revision: str, *, branch_only: bool = False) -> _Commit:
        commit = repo.commits.get(repo.branches[revision]) if revision in repo.branches else (
            None if branch_only else repo.commits.get(revision))
        if commit is None:
            raise _Refused(_error(404, f"Invalid rev id: {revision}", "RevisionNotFound"))
        return commit

    # ---- endpoints ----------------------------------------------------------------------------

    def _whoami(self, auth: bool | None) -> _Reply:
        if not auth:
            return _error(401, "Invalid credentials in Authorization header")
        return _json({
            "type": "user", "id": "0" * 24, "name": self.user, "fullname": "Fake Hub User",
            "email": f"{self.user}@example.com", "emailVerified": True, "isPro": False, "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "fake-hub", "role": "write"}},
        })

    def _create_repo(self, auth: bool | None, payload: dict) -> _Reply:
        if not auth:
            return _error(401, "You must be authenticated with a write token to create a repo")
        if payload.get("type") not in (None, "model"):
            return _error(400, "the fake hub only hosts model repos")
        name, namespace = str(payload.get("name", "")), payload.get("organization") or self.user
        if not (_NAME.match(name) and _NAME.match(namespace)):
            return _error(400, f"Invalid repo name: {namespace}/{name}")
        repo_id = f"{namespace}/{name}"
        if repo_id in self._repos:
            return _json({"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, 409,
                         {"X-Error-Message": "You already created this model repo"})
        private = payload.get("visibility") == "private" or payload.get("private") is True
        repo = self._repos[repo_id] = _Repo(repo_id, private, _now())
        first = self._new_commit(repo, None, "initial commit", "", {".gitattributes": _File(_GITATTRIBUTES, False)})
        repo.branches["main"] = first.id
        return _json({"url": f"{self.url}/{repo_id}", "name": repo_id, "id": first.id[:24]})

    def _delete_repo(self, auth: bool | None, payload: dict) -> _Reply:
        repo_id = f"{payload.get('organization') or self.user}/{payload.get('name')}"
        self._writable(repo_id, auth)  # raises when there is no such repo or no write token
        del self._repos[repo_id]
        return _json({})

    def _settings(self, repo_id: str, auth: bool | None, payload: dict) -> _Reply:
        repo = self._writable(repo_id, auth)
        if "private" in payload:
            repo.private = bool(payload["private"])
        if "visibility" in payload:
            repo.private = payload["visibility"] == "private"
        return _json({})

    def _info(self, repo_id: str, revision: str, auth: bool | None, *, blobs: bool) -> _Reply:
        repo = self._readable(repo_id, auth)
        commit = self._revision(repo, revision)
        siblings = []
        for path, f in sorted(commit.files.items()):
            entry = f.describe(path, lfs_key="sha256")
            siblings.append({"rfilename": path, "size": entry["size"], "blobId": entry["oid"],
                             **({"lfs": entry["lfs"]} if f.lfs else {})} if blobs else {"rfilename": path})
        return _json({
            "_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
            "sha": commit.id, "lastModified": commit.date, "createdAt": repo.created,
            "private": repo.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
            "tags": [], "siblings": siblings,
        })

    def _tree(self, repo_id: str, revision: str, path: str, auth: bool | None, *, recursive: bool) -> _Reply:
        repo = self._readable(repo_id, auth)
        commit = self._revision(repo, revision)
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        under = {p: f for p, f in commit.files.items() if p.startswith(prefix)}
        if prefix and not under:
            return _error(404, f"{path} does not exist on {revision}", "EntryNotFound",
                          {"X-Repo-Commit": commit.id})
        entries: dict[str, dict] = {}
        for p, f in sorted(under.items()):
            folders = p[len(prefix):].split("/")[:-1]
            for depth in range(len(folders) if recursive else min(1, len(folders))):
                folder = prefix + "/".join(folders[: depth + 1])
                entries.setdefault(folder, {"type": "directory", "path": folder, "size": 0,
                                            "oid": hashlib.sha1(f"{commit.id}:{folder}".encode()).hexdigest()})
            if recursive or not folders:
                entries[p] = f.describe(p, lfs_key="oid")
        return _json(list(entries.values()))

    def _refs(self, repo_id: str, auth: bool | None) -> _Reply:
        repo = self._readable(repo_id, auth)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in repo.branches.items()]
        return _json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _commits(self, repo_id: str, revision: str, auth: bool | None) -> _Reply:
        repo = self._readable(repo_id, auth)
        self._revision(repo, revision)  # raises for an unknown revision
        return _json([
            {"id": c.id, "title": c.title, "message": "\n\n".join(filter(None, (c.title, c.description))),
             "authors": [{"user": self.user}], "date": c.date}
            for c in self._history(repo, revision)
        ])

    def _preupload(self, repo_id: str, revision: str, auth: bool | None, payload: dict) -> _Reply:
        repo = self._writable(repo_id, auth)
        commit = self._revision(repo, revision, branch_only=True)
        answers = []
        for item in payload.get("files", []):
            path, size = item["path"], int(item["size"])
            lfs = path.endswith(LFS_SUFFIXES) or size > LFS_THRESHOLD
            existing = commit.files.get(path)
            answers.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": existing.etag if existing else None})
        return _json({"files": answers, "commitOid": commit.id})

    def _lfs_batch(self, repo_id: str, auth: bool | None, body: bytes) -> _Reply:
        repo = self._writable(repo_id, auth)
        payload = _load(body)
        if payload.get("operation") != "upload":
            return _error(400, "the fake hub only serves LFS uploads (downloads go through /resolve)")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = str(obj["oid"]), int(obj["size"])
            answer: dict = {"oid": oid, "size": size, "authenticated": True}
            if oid not in repo.lfs:  # already stored objects get no actions: the client skips them
                nonce = secrets.token_urlsafe(16)
                self._uploads[nonce] = (repo_id, oid, size)
                answer["actions"] = {
                    "upload": {"href": f"{self.url}/__lfs__/upload/{nonce}"},
                    "verify": {"href": f"{self.url}/__lfs__/verify/{repo_id}", "header": {}},
                }
            objects.append(answer)
        return _json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                     headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_upload(self, nonce: str, body: bytes) -> _Reply:
        with self._lock:
            target = self._uploads.get(nonce)
            if target is None or target[0] not in self._repos:
                return _error(403, "invalid or expired upload URL")
            repo_id, oid, size = target
            if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
                return _error(400, f"uploaded content does not match oid {oid} / size {size}")
            self._repos[repo_id].lfs[oid] = body
        return _Reply(200)

    def _lfs_verify(self, repo_id: str, auth: bool | None, body: bytes) -> _Reply:
        repo = self._writable(repo_id, auth)
        payload = _load(body)
        stored = repo.lfs.get(str(payload.get("oid")))
        if stored is None or len(stored) != payload.get("size"):
            return _error(404, f"LFS object {payload.get('oid')} not found")
        return _json({})

    def _commit_request(self, repo_id: str, revision: str, auth: bool | None, body: bytes) -> _Reply:
        """Apply an ndjson commit all at once, or not at all."""
        repo = self._writable(repo_id, auth)
        head = self._revision(repo, revision, branch_only=True)
        try:
            items = [json.loads(line) for line in body.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            return _error(400, f"malformed ndjson commit payload: {e}")
        if not items or items[0].get("key") != "header":
            return _error(400, "commit payload must start with a header line")
        summary = items[0]["value"]
        parent = summary.get("parentCommit")
        if parent and not head.id.startswith(parent):
            return _error(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for item in items[1:]:
            key, value = item.get("key"), item.get("value", {})
            path = str(value.get("path", ""))
            if key == "file":
                files[path] = _File(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                content = repo.lfs.get(value.get("oid", ""))
                if content is None or ("size" in value and len(content) != value["size"]):
                    return _error(400, f"LFS object {value.get('oid')} for {path} was never uploaded")
                files[path] = _File(content, lfs=True)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    return _error(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                inside = [p for p in files if p.startswith(path.rstrip("/") + "/")]
                if not inside:
                    return _error(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in inside:
                    del files[p]
            else:
                return _error(400, f"unknown commit operation {key!r}")
        commit = self._new_commit(repo, head, summary.get("summary", ""), summary.get("description", ""), files)
        repo.branches[revision] = commit.id
        return _json({"commitUrl": f"{self.url}/{repo_id}/commit/{commit.id}", "commitOid": commit.id,
                      "commitMessage": commit.title, "hookOutput": "", "pullRequestUrl": None, "success": True})

    def _create_branch(self, repo_id: str, branch: str, auth: bool | None, payload: dict) -> _Reply:
        repo = self._writable(repo_id, auth)
        if branch.startswith("refs/") or not branch or branch.endswith("/") or ".." in branch:
            return _error(400, f"Invalid reference for a branch: {branch}")
        if branch in repo.branches:
            return _error(409, "Reference already exists")
        start = self._revision(repo, payload.get("startingPoint") or "main")
        repo.branches[branch] = start.id
        return _json({})

    def _delete_branch(self, repo_id: str, branch: str, auth: bool | None) -> _Reply:
        repo = self._writable(repo_id, auth)
        if branch == "main":
            return _error(403, "You cannot delete the default branch")
        if repo.branches.pop(branch, None) is None:
            return _error(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        return _json({})

    def _resolve(self, repo_id: str, revision: str, path: str, auth: bool | None, range_: str | None) -> _Reply:
        """A file download (GET) or its metadata (HEAD: the same headers, no body)."""
        repo = self._readable(repo_id, auth)
        commit = self._revision(repo, revision)
        f = commit.files.get(path)
        if f is None:
            return _error(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.id})
        headers = {"ETag": f'"{f.etag}"', "X-Repo-Commit": commit.id, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if f.lfs:
            headers |= {"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(len(f.content))}
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", (range_ or "").strip())
        if match and match.group(1):
            start, end = int(match.group(1)), int(match.group(2) or len(f.content) - 1)
            end = min(end, len(f.content) - 1)
            if start > end:
                return _error(416, "Requested range not satisfiable")
            headers["Content-Range"] = f"bytes {start}-{end}/{len(f.content)}"
            return _Reply(206, f.content[start : end + 1], headers)
        return _Reply(200, f.content, headers)


def _load(body: bytes) -> dict:
    try:
        value = json.loads(body or b"{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _no_route(method: str, path: str) -> _Reply:
    return _error(404, f"the fake hub has no route for {method} {path}")


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 plumbing: read the request, apply injected faults, send the FakeHub's reply."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    timeout = 60  # an idle keep-alive connection frees its thread eventually

    def setup(self) -> None:
        super().setup()
        with self.server.hub._lock:  # type: ignore[attr-defined]
            self.server.hub._connections.add(self.connection)  # type: ignore[attr-defined]

    def finish(self) -> None:
        with self.server.hub._lock:  # type: ignore[attr-defined]
            self.server.hub._connections.discard(self.connection)  # type: ignore[attr-defined]
        try:
            super().finish()
        except OSError:
            pass

    def _serve(self) -> None:
        hub: FakeHub = self.server.hub  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        path = unquote(url.path)
        hub._record(self.command, path)
        fault = hub._take_fault(self.command, path)
        if fault is not None and fault.status is None:
            self._read_body(partial=True)
            self.close_connection = True  # and answer nothing
            return
        body = self._read_body()
        if fault is not None:
            reply = _error(fault.status or 500, f"injected failure: HTTP {fault.status}")
        else:
            try:
                reply = hub._dispatch(self.command, url.path, parse_qs(url.query), self.headers, body)
            except Exception as e:  # a request the fake cannot parse: say so at once (400s are not retried)
                reply = _error(400, f"the fake hub could not handle {self.command} {path}: {e!r}")
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

    def _read_body(self, *, partial: bool = False) -> bytes:
        """The request body (Content-Length or chunked); with ``partial``, only its first half."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
                if partial:
                    return chunks[0]
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length // 2 if partial else length)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - keep test output quiet
        pass
