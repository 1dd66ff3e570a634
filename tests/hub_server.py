"""A loopback, Hub-compatible HTTP server for offline tests (standard library only).

It implements the part of the Hugging Face Hub HTTP API that `huggingface_hub` (HfApi, hf_hub_download,
snapshot_download, HfFileSystem), `datasets` (push_to_hub / load_dataset) and `transformers`
(push_to_hub / from_pretrained) use: repo create/delete/settings, repo info, tree and paths-info listings,
refs, commits, branches, tags, preupload, NDJSON commits, the Git LFS batch API (basic transfer + verify),
file resolution with the Hub's headers (ETag, X-Repo-Commit, X-Linked-Etag/-Size, LFS redirects, ranges)
and whoami. Each repo holds a linear history per branch; a commit is a full snapshot path -> file entry.

Example:
    >>> from huggingface_hub import HfApi
    >>> with HubServer(tokens={"tok": "alice"}) as hub:  # doctest: +SKIP
    ...     api = HfApi(endpoint=hub.url, token="tok")
    ...     api.create_repo("alice/demo").repo_id
    'alice/demo'
"""

from __future__ import annotations

import base64
import datetime as _dt
import fnmatch
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

logger = logging.getLogger(__name__)

REPO_TYPES = ("model", "dataset", "space")
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files of 10 MiB or more in LFS
_LFS_PATTERNS = (
    "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lz4 *.mlmodel *.model *.msgpack *.npy *.npz "
    "*.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors *.tar *.tflite *.tgz *.wasm *.xz "
    "*.zip *.zst *tfevents* *.faiss *.index *.jpg *.jpeg *.png *.webp *.gif *.mp3 *.wav *.flac *.mp4"
).split()
DEFAULT_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in _LFS_PATTERNS)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class FileEntry:
    sha256: str
    size: int
    lfs: bool
    git_oid: str


@dataclass
class Commit:
    id: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    files: dict[str, FileEntry]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pull_requests: dict[str, str] = field(default_factory=dict)  # "refs/pr/N" -> commit

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]


class HubError(Exception):
    """An HTTP error answer: status, optional X-Error-Code, message (sent as X-Error-Message and JSON body)."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def verify_request(self, request, client_address) -> bool:  # refuse anything not from this machine
        return client_address[0] == "127.0.0.1"


class HubServer:
    """Hub-compatible server bound to 127.0.0.1 serving until :meth:`stop`.

    Args:
        port: port to bind (0: any free port).
        tokens: maps an access token to the username it authenticates.
        storage_dir: where blobs and the repo state are kept (memory only when None); a server started on
            an existing storage_dir reloads its repos.
    """

    def __init__(self, port: int = 0, tokens: dict[str, str] | None = None, storage_dir: str | None = None):
        self.port = port
        self.tokens = dict(tokens or {})
        self.storage_dir = storage_dir
        self._secret = secrets.token_bytes(32)
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], Repo] = {}
        self._blobs: dict[str, bytes] = {}
        self._counter = 0
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        if storage_dir:
            os.makedirs(os.path.join(storage_dir, "blobs"), exist_ok=True)
            self._load_state()

    # ----------------------------------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("HubServer is not started")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> "HubServer":
        if self._httpd is not None:
            return self
        handler = type("BoundHubHandler", (_Handler,), {"hub": self})
        self._httpd = _Server(("127.0.0.1", self.port), handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        logger.info("Hub server listening on %s", self.url)
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._httpd, self._thread = None, None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------------------------------- storage
    def put_blob(self, content: bytes) -> str:
        sha = hashlib.sha256(content).hexdigest()
        with self._lock:
            if self.storage_dir:
                path = os.path.join(self.storage_dir, "blobs", sha)
                if not os.path.exists(path):
                    with open(path + ".tmp", "wb") as f:
                        f.write(content)
                    os.replace(path + ".tmp", path)
            else:
                self._blobs[sha] = content
        return sha

    def has_blob(self, sha: str) -> bool:
        if self.storage_dir:
            return os.path.exists(os.path.join(self.storage_dir, "blobs", sha))
        return sha in self._blobs

    def get_blob(self, sha: str) -> bytes:
        if self.storage_dir:
            with open(os.path.join(self.storage_dir, "blobs", sha), "rb") as f:
                return f.read()
        return self._blobs[sha]

    def _save_state(self) -> None:
        if not self.storage_dir:
            return
        state = {
            "counter": self._counter,
            "repos": [
                {
                    "repo_type": r.repo_type, "repo_id": r.repo_id, "private": r.private, "created_at": r.created_at,
                    "branches": r.branches, "tags": r.tags, "pull_requests": r.pull_requests,
                    "commits": [
                        {**{k: getattr(c, k) for k in ("id", "parent", "title", "message", "author", "date")},
                         "files": {p: vars(e) for p, e in c.files.items()}}
                        for c in r.commits.values()
                    ],
                }
                for r in self._repos.values()
            ],
        }
        path = os.path.join(self.storage_dir, "state.json")
        with open(path + ".tmp", "w") as f:
            json.dump(state, f)
        os.replace(path + ".tmp", path)

    def _load_state(self) -> None:
        path = os.path.join(self.storage_dir or "", "state.json")
        if not os.path.exists(path):
            return
        with open(path) as f:
            state = json.load(f)
        self._counter = state["counter"]
        for r in state["repos"]:
            repo = Repo(r["repo_type"], r["repo_id"], r["private"], r["created_at"], branches=r["branches"],
                        tags=r["tags"], pull_requests=r["pull_requests"])
            for c in r["commits"]:
                files = {p: FileEntry(**e) for p, e in c.pop("files").items()}
                repo.commits[c["id"]] = Commit(**c, files=files)
            self._repos[(repo.repo_type, repo.repo_id)] = repo

    # ----------------------------------------------------------------------------------------- model
    def _sign(self, text: str) -> str:
        return hmac.new(self._secret, text.encode(), hashlib.sha256).hexdigest()[:32]

    def _new_commit(self, repo: Repo, parent: str | None, files: dict[str, FileEntry], title: str,
                    message: str, author: str) -> Commit:
        self._counter += 1
        seed = json.dumps([repo.repo_id, parent, sorted((p, e.git_oid) for p, e in files.items()), title,
                           self._counter, secrets.token_hex(4)])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, title, message, author, _now(), files)
        repo.commits[commit.id] = commit
        return commit

    def _entry_for(self, content: bytes, lfs: bool) -> FileEntry:
        sha = self.put_blob(content)
        oid = _git_blob_oid(_lfs_pointer(sha, len(content))) if lfs else _git_blob_oid(content)
        return FileEntry(sha, len(content), lfs, oid)

    def create_repo(self, repo_type: str, repo_id: str, private: bool, author: str) -> Repo:
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise HubError(409, f"You already created this {repo_type} repo")
            repo = Repo(repo_type, repo_id, private, _now())
            files = {".gitattributes": self._entry_for(DEFAULT_GITATTRIBUTES.encode(), lfs=False)}
            commit = self._new_commit(repo, None, files, "initial commit", "", author)
            repo.branches["main"] = commit.id
            self._repos[(repo_type, repo_id)] = repo
            self._save_state()
            return repo

    def resolve_revision(self, repo: Repo, revision: str) -> str:
        """Return the commit id a branch, tag, PR ref or (full) commit id points to; 404 RevisionNotFound."""
        for prefix, refs in (("refs/heads/", repo.branches), ("refs/tags/", repo.tags)):
            if revision.startswith(prefix) and revision[len(prefix):] in refs:
                return refs[revision[len(prefix):]]
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.tags:
            return repo.tags[revision]
        if revision in repo.pull_requests:
            return repo.pull_requests[revision]
        if revision in repo.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def history(self, repo: Repo, commit_id: str) -> list[Commit]:
        out, cur = [], commit_id
        while cur is not None:
            out.append(repo.commits[cur])
            cur = repo.commits[cur].parent
        return out

    def last_commits(self, repo: Repo, commit_id: str) -> dict[str, Commit]:
        """For every path (and folder) of a snapshot, the most recent commit that changed it."""
        hist = self.history(repo, commit_id)
        out: dict[str, Commit] = {}
        for i, commit in enumerate(hist):
            parent_files = hist[i + 1].files if i + 1 < len(hist) else {}
            for path, entry in commit.files.items():
                if path in out or parent_files.get(path) == entry:
                    continue
                out[path] = commit
                parts = path.split("/")
                for k in range(1, len(parts)):
                    out.setdefault("/".join(parts[:k]), commit)
        return out


def _lfs_rules(gitattributes: str) -> list[str]:
    rules = []
    for line in gitattributes.splitlines():
        parts = line.split()
        if len(parts) >= 2 and "filter=lfs" in parts[1:]:
            rules.append(parts[0])
    return rules


def _matches_lfs(path: str, rules: list[str]) -> bool:
    name = path.rsplit("/", 1)[-1]
    for rule in rules:
        if "/" in rule:
            if fnmatch.fnmatchcase(path, rule.lstrip("/").replace("**/", "*")):
                return True
        elif fnmatch.fnmatchcase(name, rule):
            return True
    return False


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer  # set on the per-server subclass
    protocol_version = "HTTP/1.1"
    server_version = "HubServer/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("%s - %s", self.address_string(), format % args)

    # ----------------------------------------------------------------------------------------- plumbing
    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline().strip().split(b";")[0]
                size = int(size_line or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str | None = None,
              content_length: int | None = None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers, "application/json; charset=utf-8")

    def _error(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message.replace("\n", " "), **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._json({"error": err.message, **err.extra}, err.status, headers)

    def _user(self) -> str | None:
        """The authenticated username, None for anonymous; 401 for a token the server does not know."""
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        scheme, _, token = auth.partition(" ")
        user = self.hub.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _repo(self, repo_type: str, repo_id: str, user: str | None, write: bool = False) -> Repo:
        repo = self.hub._repos.get((repo_type, repo_id))
        visible = repo is not None and (not repo.private or user == repo.namespace)
        if not visible:
            status = 401 if user is None else 404
            raise HubError(status, "Repository not found", "RepoNotFound")
        if write and user != repo.namespace:
            if user is None:
                raise HubError(401, "You must be authenticated to write to this repo")
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _base(self) -> str:
        return self.hub.url

    def _repo_url(self, repo: Repo) -> str:
        return f"{self._base()}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        raw = [s for s in split.path.split("/") if s != ""]
        segs = [unquote(s) for s in raw]
        self.body = self._read_body()
        try:
            with self.hub._lock:
                self._route(segs)
        except HubError as err:
            self._error(err)
        except (ValueError, KeyError, json.JSONDecodeError) as exc:
            logger.debug("bad request %s %s: %r", self.command, split.path, exc)
            self._error(HubError(400, f"Bad request: {exc}"))

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # ----------------------------------------------------------------------------------------- routing
    def _route(self, s: list[str]) -> None:
        m = self.command
        if s[:2] == ["api", "whoami-v2"] and m == "GET":
            return self._whoami()
        if s[:2] == ["api", "validate-yaml"] and m == "POST":
            return self._validate_yaml()
        if s[:2] == ["api", "repos"] and len(s) == 3:
            if s[2] == "create" and m == "POST":
                return self._create_repo()
            if s[2] == "delete" and m == "DELETE":
                return self._delete_repo()
        if len(s) >= 4 and s[0] == "api" and s[1] in _PLURAL:
            return self._api_repo(_PLURAL[s[1]], f"{s[2]}/{s[3]}", s[4:])
        if s and s[0] == "_lfs":
            return self._lfs_transfer(s[1:])
        repo_type = "model"
        if s and s[0] in ("datasets", "spaces"):
            repo_type, s = _PLURAL[s[0]], s[1:]
        if len(s) >= 6 and s[1].endswith(".git") and s[2:5] == ["info", "lfs", "objects"]:
            return self._lfs_batch(repo_type, f"{s[0]}/{s[1][:-4]}", s[5:])
        if len(s) >= 5 and s[2] == "resolve" and m in ("GET", "HEAD"):
            return self._resolve(repo_type, f"{s[0]}/{s[1]}", s[3], "/".join(s[4:]))
        raise HubError(404, f"Not found: {self.command} {urlsplit(self.path).path}")

    def _api_repo(self, repo_type: str, repo_id: str, rest: list[str]) -> None:
        m, user = self.command, self._user()
        head = rest[0] if rest else None
        if head is None and m == "GET":
            return self._info(self._repo(repo_type, repo_id, user), "main")
        if head == "revision" and len(rest) >= 2 and m == "GET":
            return self._info(self._repo(repo_type, repo_id, user), "/".join(rest[1:]))
        if head == "settings" and m == "PUT":
            return self._settings(self._repo(repo_type, repo_id, user, write=True))
        if head == "tree" and len(rest) >= 2 and m == "GET":
            return self._tree(self._repo(repo_type, repo_id, user), rest[1], "/".join(rest[2:]))
        if head == "paths-info" and len(rest) == 2 and m == "POST":
            return self._paths_info(self._repo(repo_type, repo_id, user), rest[1])
        if head == "refs" and m == "GET":
            return self._refs(self._repo(repo_type, repo_id, user))
        if head == "commits" and len(rest) >= 2 and m == "GET":
            return self._commits(self._repo(repo_type, repo_id, user), "/".join(rest[1:]))
        if head == "branch" and len(rest) >= 2 and m in ("POST", "DELETE"):
            return self._branch(self._repo(repo_type, repo_id, user, write=True), "/".join(rest[1:]), user)
        if head == "tag" and len(rest) >= 2 and m in ("POST", "DELETE"):
            return self._tag(self._repo(repo_type, repo_id, user, write=True), "/".join(rest[1:]))
        if head == "preupload" and len(rest) >= 2 and m == "POST":
            return self._preupload(self._repo(repo_type, repo_id, user, write=True), "/".join(rest[1:]))
        if head == "commit" and len(rest) >= 2 and m == "POST":
            return self._commit(self._repo(repo_type, repo_id, user, write=True), "/".join(rest[1:]), user)
        raise HubError(404, f"Not found: {m} {urlsplit(self.path).path}")

    # ----------------------------------------------------------------------------------------- account / repos
    def _whoami(self) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        self._json({
            "type": "user", "id": hashlib.sha1(user.encode()).hexdigest()[:24], "name": user, "fullname": user,
            "email": None, "emailVerified": False, "isPro": False, "canPay": False, "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "hub-server", "role": "write"}},
        })

    def _validate_yaml(self) -> None:
        content = json.loads(self.body or b"{}").get("content", "")
        errors = []
        if content.startswith("---"):
            end = content.find("\n---", 3)
            try:
                import yaml

                meta = yaml.safe_load(content[3:end] if end != -1 else content[3:])
                if meta is not None and not isinstance(meta, dict):
                    errors.append({"message": "YAML metadata must be a mapping"})
            except ImportError:
                pass
            except Exception as exc:  # any yaml.YAMLError
                errors.append({"message": f"Invalid YAML: {exc}"})
        self._json({"errors": errors, "warnings": []}, 400 if errors else 200)

    def _create_repo(self) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        payload = json.loads(self.body or b"{}")
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        namespace = payload.get("organization") or user
        name = payload.get("name") or ""
        if not name or "/" in name:
            raise HubError(400, f"Invalid repo name {name!r}")
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a repo under the namespace {namespace!r}")
        repo_id = f"{namespace}/{name}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        url = f"{self._base()}/{_URL_PREFIX[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.hub._repos:  # the Hub names the existing repo in its 409 answer
            raise HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
        repo = self.hub.create_repo(repo_type, repo_id, private, user)
        self._json({"url": self._repo_url(repo), "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        user = self._user()
        payload = json.loads(self.body or b"{}")
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or user}/{payload.get('name')}"
        repo = self._repo(repo_type, repo_id, user, write=True)
        del self.hub._repos[(repo.repo_type, repo.repo_id)]
        self.hub._save_state()
        self._send(200)

    def _settings(self, repo: Repo) -> None:
        payload = json.loads(self.body or b"{}")
        if "visibility" in payload:
            repo.private = payload["visibility"] == "private"
        elif "private" in payload:
            repo.private = bool(payload["private"])
        self.hub._save_state()
        self._json({"private": repo.private})

    # ----------------------------------------------------------------------------------------- read API
    def _info(self, repo: Repo, revision: str) -> None:
        commit = repo.commits[self.hub.resolve_revision(repo, revision)]
        blobs = self.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path in sorted(commit.files):
            entry = commit.files[path]
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                sib.update(size=entry.size, blobId=entry.git_oid)
                if entry.lfs:
                    sib["lfs"] = {"size": entry.size, "sha256": entry.sha256,
                                  "pointerSize": len(_lfs_pointer(entry.sha256, entry.size))}
            siblings.append(sib)
        self._json({
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
            "author": repo.namespace, "sha": commit.id, "lastModified": commit.date, "createdAt": repo.created_at,
            "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
            "siblings": siblings, "usedStorage": sum(e.size for e in commit.files.values()),
        })

    def _tree_item(self, path: str, commit: Commit, last: dict[str, Commit] | None) -> dict:
        entry = commit.files.get(path)
        if entry is not None:
            item: dict[str, Any] = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": path}
            if entry.lfs:
                item["lfs"] = {"oid": entry.sha256, "size": entry.size,
                               "pointerSize": len(_lfs_pointer(entry.sha256, entry.size))}
        else:
            children = sorted((p, e.git_oid) for p, e in commit.files.items() if p.startswith(path + "/"))
            item = {"type": "directory", "oid": hashlib.sha1(json.dumps(children).encode()).hexdigest(),
                    "size": 0, "path": path}
        if last is not None and path in last:
            c = last[path]
            item["lastCommit"] = {"id": c.id, "title": c.title, "date": c.date}
        return item

    @staticmethod
    def _dirs(commit: Commit) -> set[str]:
        return {"/".join(p.split("/")[:k]) for p in commit.files for k in range(1, p.count("/") + 1)}

    def _flag(self, name: str) -> bool:
        return self.query.get(name, ["false"])[0].lower() in ("1", "true")

    def _tree(self, repo: Repo, revision: str, path: str) -> None:
        commit = repo.commits[self.hub.resolve_revision(repo, revision)]
        path = path.strip("/")
        dirs = self._dirs(commit)
        if path and path not in dirs:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.id})
        recursive = self._flag("recursive")
        last = self.hub.last_commits(repo, commit.id) if self._flag("expand") else None
        prefix = path + "/" if path else ""
        items = []
        for p in sorted(set(commit.files) | dirs):
            if not p.startswith(prefix):
                continue
            if recursive or "/" not in p[len(prefix):]:
                items.append(self._tree_item(p, commit, last))
        # The Hub lists folders before files at each level; order within a listing does not matter to clients.
        self._json(items)

    def _paths_info(self, repo: Repo, revision: str) -> None:
        commit = repo.commits[self.hub.resolve_revision(repo, revision)]
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            payload = json.loads(self.body or b"{}")
            paths, expand = payload.get("paths", []), bool(payload.get("expand"))
        else:
            form = parse_qs(self.body.decode(), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = form.get("expand", ["false"])[0].lower() in ("1", "true")
        if isinstance(paths, str):
            paths = [paths]
        dirs = self._dirs(commit)
        last = self.hub.last_commits(repo, commit.id) if expand else None
        out = []
        for p in paths:
            p = p.strip("/")
            if p in commit.files or p in dirs:
                out.append(self._tree_item(p, commit, last))
        self._json(out)

    def _refs(self, repo: Repo) -> None:
        def fmt(name: str, ref: str, target: str) -> dict:
            return {"name": name, "ref": ref, "targetCommit": target}

        out = {
            "branches": [fmt(n, f"refs/heads/{n}", c) for n, c in sorted(repo.branches.items())],
            "converts": [],
            "tags": [fmt(n, f"refs/tags/{n}", c) for n, c in sorted(repo.tags.items())],
        }
        if self._flag("include_prs"):
            out["pullRequests"] = [fmt(n, n, c) for n, c in sorted(repo.pull_requests.items())]
        self._json(out)

    def _commits(self, repo: Repo, revision: str) -> None:
        commit_id = self.hub.resolve_revision(repo, revision)
        self._json([
            {"id": c.id, "title": c.title, "message": c.message, "authors": [{"user": c.author}], "date": c.date}
            for c in self.hub.history(repo, commit_id)
        ])

    # ----------------------------------------------------------------------------------------- refs (write)
    def _branch(self, repo: Repo, name: str, user: str) -> None:
        if self.command == "DELETE":
            if name not in repo.branches:
                raise HubError(404, f"Branch {name} not found", "RevisionNotFound")
            if name == "main":
                raise HubError(403, "Cannot delete the default branch")
            del repo.branches[name]
        else:
            if name in repo.branches:
                raise HubError(409, f"Branch {name} already exists")
            payload = json.loads(self.body or b"{}")
            start = payload.get("startingPoint") or "main"
            target = self.hub.resolve_revision(repo, start)
            if payload.get("emptyBranch"):
                target = self.hub._new_commit(repo, None, {}, "empty branch", "", user).id
            repo.branches[name] = target
        self.hub._save_state()
        self._send(200)

    def _tag(self, repo: Repo, name: str) -> None:
        if self.command == "DELETE":
            if name not in repo.tags:
                raise HubError(404, f"Tag {name} not found", "RevisionNotFound")
            del repo.tags[name]
        else:
            payload = json.loads(self.body or b"{}")
            tag = payload.get("tag")
            if not tag:
                raise HubError(400, "Missing 'tag'")
            if tag in repo.tags:
                raise HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = self.hub.resolve_revision(repo, name)
        self.hub._save_state()
        self._send(200)

    # ----------------------------------------------------------------------------------------- uploads
    def _preupload(self, repo: Repo, revision: str) -> None:
        commit = repo.commits[self.hub.resolve_revision(repo, revision)]
        payload = json.loads(self.body or b"{}")
        attributes = commit.files.get(".gitattributes")
        rules = _lfs_rules(self.hub.get_blob(attributes.sha256).decode()) if attributes else []
        out = []
        for f in payload.get("files", []):
            path, size = f["path"], int(f["size"])
            sample = base64.b64decode(f.get("sample", ""))
            lfs = size >= LFS_SIZE_THRESHOLD or _matches_lfs(path, rules) or b"\x00" in sample
            existing = commit.files.get(path)
            oid = None
            if existing is not None:
                if lfs and existing.lfs:
                    oid = existing.sha256
                elif not lfs and not existing.lfs:
                    oid = existing.git_oid
            out.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._json({"files": out, "commitOid": commit.id})

    def _lfs_batch(self, repo_type: str, repo_id: str, rest: list[str]) -> None:
        user = self._user()
        if rest != ["batch"] or self.command != "POST":
            raise HubError(404, "Not found")
        payload = json.loads(self.body or b"{}")
        operation = payload.get("operation")
        repo = self._repo(repo_type, repo_id, user, write=operation == "upload")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = str(obj.get("oid", "")), int(obj.get("size", -1))
            if len(oid) != 64 or any(ch not in "0123456789abcdef" for ch in oid) or size < 0:
                objects.append({"oid": oid, "size": max(size, 0), "error": {"code": 422, "message": "Invalid oid"}})
                continue
            item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if operation == "upload" and not self.hub.has_blob(oid):
                ticket = self.hub._sign(f"upload:{oid}:{size}")
                item["actions"] = {
                    "upload": {"href": f"{self._base()}/_lfs/upload/{oid}/{size}/{ticket}", "header": {}},
                    "verify": {"href": f"{self._base()}/_lfs/verify/{oid}/{size}/{ticket}", "header": {}},
                }
            elif operation == "download":
                if not self.hub.has_blob(oid):
                    item = {"oid": oid, "size": size, "error": {"code": 404, "message": "Object does not exist"}}
                else:
                    item["actions"] = {"download": {"href": self._blob_href(oid), "header": {}}}
            objects.append(item)
        logger.debug("LFS batch for %s %s: %d objects", repo.repo_type, repo.repo_id, len(objects))
        self._send(200, json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _blob_href(self, sha: str, commit: str | None = None) -> str:
        href = f"{self._base()}/_lfs/blob/{sha}/{self.hub._sign('blob:' + sha)}"
        return href + (f"?commit={commit}" if commit else "")

    def _lfs_transfer(self, rest: list[str]) -> None:
        kind = rest[0] if rest else ""
        if kind in ("upload", "verify") and len(rest) == 4:
            oid, size, ticket = rest[1], int(rest[2]), rest[3]
            if not hmac.compare_digest(ticket, self.hub._sign(f"upload:{oid}:{size}")):
                raise HubError(403, "Invalid upload ticket")
            if kind == "upload" and self.command == "PUT":
                if len(self.body) != size or hashlib.sha256(self.body).hexdigest() != oid:
                    raise HubError(400, "Uploaded content does not match the announced sha256/size")
                self.hub.put_blob(self.body)
                return self._send(200, headers={"ETag": f'"{oid}"'})
            if kind == "verify" and self.command == "POST":
                payload = json.loads(self.body or b"{}")
                if payload.get("oid") != oid or int(payload.get("size", -1)) != size or not self.hub.has_blob(oid):
                    raise HubError(404, "Object not uploaded or size mismatch")
                return self._json({"success": True})
        if kind == "blob" and len(rest) == 3 and self.command in ("GET", "HEAD"):
            sha, sig = rest[1], rest[2]
            if not hmac.compare_digest(sig, self.hub._sign("blob:" + sha)) or not self.hub.has_blob(sha):
                raise HubError(403, "Invalid or expired signature")
            headers = {"ETag": f'"{sha}"'}
            if "commit" in self.query:
                headers["X-Repo-Commit"] = self.query["commit"][0]
            return self._send_content(self.hub.get_blob(sha), headers)
        raise HubError(404, "Not found")

    def _commit(self, repo: Repo, revision: str, user: str) -> None:
        lines = [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first NDJSON line must be the commit header")
        header = lines[0]["value"]
        create_pr = self.query.get("create_pr", ["0"])[0] in ("1", "true")
        if revision in repo.branches:
            branch_ref, head = ("branch", revision), repo.branches[revision]
        elif revision.startswith("refs/heads/") and revision[11:] in repo.branches:
            branch_ref, head = ("branch", revision[11:]), repo.branches[revision[11:]]
        elif revision in repo.pull_requests:
            branch_ref, head = ("pr", revision), repo.pull_requests[revision]
        else:
            self.hub.resolve_revision(repo, revision)  # 404 RevisionNotFound when unknown
            raise HubError(400, f"Revision {revision} is not a branch: cannot commit to it")
        parent_commit = header.get("parentCommit")
        if parent_commit and parent_commit != head:
            raise HubError(412, f"Parent commit {parent_commit} is not the head of {revision} ({head})")
        files = dict(repo.commits[head].files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = str(value.get("path", "")).strip("/")
            if not path and key != "deletedFolder":
                raise HubError(400, f"Missing path in {key} operation")
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                files[path] = self.hub._entry_for(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                oid = value["oid"]
                if not self.hub.has_blob(oid):
                    raise HubError(400, f"LFS object {oid} for {path} was not uploaded")
                content_size = len(self.hub.get_blob(oid))
                if "size" in value and int(value["size"]) != content_size:
                    raise HubError(400, f"Size mismatch for LFS file {path}")
                files[path] = FileEntry(oid, content_size, True, _git_blob_oid(_lfs_pointer(oid, content_size)))
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                doomed = [p for p in files if not path or p.startswith(path + "/")]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            else:
                raise HubError(400, f"Unsupported commit operation {key!r}")
        title = header.get("summary") or "Upload files"
        pr_url = None
        if create_pr:
            number = len(repo.pull_requests) + 1
            branch_ref = ("pr", f"refs/pr/{number}")
            pr_url = f"{self._repo_url(repo)}/discussions/{number}"
        commit = self.hub._new_commit(repo, head, files, title, header.get("description") or "", user)
        (repo.branches if branch_ref[0] == "branch" else repo.pull_requests)[branch_ref[1]] = commit.id
        self.hub._save_state()
        logger.debug("commit %s on %s %s (%s)", commit.id, repo.repo_id, branch_ref[1], title)
        self._json({"success": True, "commitOid": commit.id, "commitUrl": f"{self._repo_url(repo)}/commit/{commit.id}",
                    "pullRequestUrl": pr_url})

    # ----------------------------------------------------------------------------------------- downloads
    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_type, repo_id, self._user())
        commit = repo.commits[self.hub.resolve_revision(repo, revision)]
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.id})
        headers = {"X-Repo-Commit": commit.id, "Accept-Ranges": "bytes"}
        if entry.lfs:
            headers.update({
                "ETag": f'"{entry.git_oid}"', "X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": entry.size,
                "Location": self._blob_href(entry.sha256, commit.id),
            })
            return self._send(302, headers=headers)
        headers["ETag"] = f'"{entry.git_oid}"'
        self._send_content(self.hub.get_blob(entry.sha256), headers)

    def _send_content(self, content: bytes, headers: dict) -> None:
        size = len(content)
        headers = {**headers, "Accept-Ranges": "bytes"}
        rng = self.headers.get("Range")
        if rng and rng.strip().lower().startswith("bytes="):
            spec = rng.strip()[6:].split(",")[0].strip()
            start_s, _, end_s = spec.partition("-")
            if start_s == "":
                start, end = max(size - int(end_s), 0), size - 1
            else:
                start, end = int(start_s), (int(end_s) if end_s else size - 1)
            end = min(end, size - 1)
            if start >= size or start > end:
                headers["Content-Range"] = f"bytes */{size}"
                return self._send(416, headers=headers)
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            return self._send(206, content[start:end + 1], headers, "application/octet-stream")
        self._send(200, content, headers, "application/octet-stream")


__all__ = ["HubServer", "HubError", "DEFAULT_GITATTRIBUTES", "LFS_SIZE_THRESHOLD"]
