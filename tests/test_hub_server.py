"""The loopback Hub server against the real huggingface_hub client."""

from __future__ import annotations

import base64
import hashlib
import os

import json
import urllib.error
import urllib.request

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    HfFileSystem,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hub_fixtures import ALICE_TOKEN, BOB_TOKEN, hub, unique_repo  # noqa: F401 - `hub` is a fixture
from hub_server import LFS_SIZE_THRESHOLD, HubServer


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


class _Resp:
    def __init__(self, status: int, headers, content: bytes):
        self.status_code, self.headers, self.content = status, headers, content

    def json(self):
        return json.loads(self.content)


def _http(method: str, url: str, headers: dict | None = None, json_body=None, content: bytes | None = None,
          follow_redirects: bool = True) -> _Resp:
    """A raw HTTP call with the standard library (the Hub clients' own HTTP stack is private)."""
    data = json.dumps(json_body).encode() if json_body is not None else content
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if json_body is not None:
        request.add_header("Content-Type", "application/json")
    opener = urllib.request.build_opener(*([] if follow_redirects else [_NoRedirect()]))
    try:
        with opener.open(request, timeout=30) as resp:
            return _Resp(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as err:
        return _Resp(err.code, err.headers, err.read())


@pytest.fixture
def alice(hub) -> HfApi:
    return HfApi(endpoint=hub.url, token=ALICE_TOKEN)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_upload_download_list_text_and_lfs(alice, tmp_path):
    repo_id = unique_repo("files")
    url = alice.create_repo(repo_id)
    assert url.repo_id == repo_id
    binary = os.urandom(50_000)
    alice.upload_file(path_or_fileobj=b"hello hub\n", path_in_repo="notes/readme.txt", repo_id=repo_id)
    alice.upload_file(path_or_fileobj=binary, path_in_repo="weights.bin", repo_id=repo_id)

    assert sorted(alice.list_repo_files(repo_id)) == [".gitattributes", "notes/readme.txt", "weights.bin"]
    infos = {i.path: i for i in alice.get_paths_info(repo_id, ["notes/readme.txt", "weights.bin", "missing"])}
    assert set(infos) == {"notes/readme.txt", "weights.bin"}
    assert infos["notes/readme.txt"].lfs is None
    assert infos["weights.bin"].lfs.sha256 == hashlib.sha256(binary).hexdigest()
    assert infos["weights.bin"].size == len(binary)

    cache = tmp_path / "cache"
    assert _read(hf_hub_download(repo_id, "weights.bin", cache_dir=cache, token=ALICE_TOKEN)) == binary
    assert _read(hf_hub_download(repo_id, "notes/readme.txt", cache_dir=cache)) == b"hello hub\n"
    snapshot = snapshot_download(repo_id, cache_dir=tmp_path / "snap")
    assert _read(os.path.join(snapshot, "weights.bin")) == binary

    tree = list(alice.list_repo_tree(repo_id))  # non-recursive: the folder, not its files
    assert {e.path for e in tree} == {".gitattributes", "notes", "weights.bin"}
    info = alice.model_info(repo_id, files_metadata=True)
    assert {s.rfilename for s in info.siblings} == {".gitattributes", "notes/readme.txt", "weights.bin"}
    assert info.sha == alice.list_repo_commits(repo_id)[0].commit_id


def test_lfs_redirect_headers_and_ranges(alice, hub):
    repo_id = unique_repo("ranges")
    alice.create_repo(repo_id)
    data = bytes(range(256)) * 40
    alice.upload_file(path_or_fileobj=data, path_in_repo="model.safetensors", repo_id=repo_id)
    alice.upload_file(path_or_fileobj=b"0123456789", path_in_repo="digits.txt", repo_id=repo_id)
    head = _http("HEAD", f"{hub.url}/{repo_id}/resolve/main/model.safetensors", follow_redirects=False)
    assert head.status_code == 302
    assert head.headers["X-Linked-Etag"].strip('"') == hashlib.sha256(data).hexdigest()
    assert int(head.headers["X-Linked-Size"]) == len(data)
    assert len(head.headers["X-Repo-Commit"]) == 40
    got = _http("GET", f"{hub.url}/{repo_id}/resolve/main/model.safetensors",
                headers={"Range": "bytes=100-199"})
    assert got.status_code == 206 and got.content == data[100:200]
    assert got.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    tail = _http("GET", f"{hub.url}/{repo_id}/resolve/main/digits.txt", headers={"Range": "bytes=-3"})
    assert tail.status_code == 206 and tail.content == b"789"
    assert _http("GET", f"{hub.url}/{repo_id}/resolve/main/digits.txt", headers={"Range": "bytes=50-"}).status_code == 416

    fs = HfFileSystem(endpoint=hub.url, token=ALICE_TOKEN)
    with fs.open(f"{repo_id}/model.safetensors", "rb", block_size=1000) as f:
        f.seek(2500)
        assert f.read(700) == data[2500:3200]
    assert fs.info(f"{repo_id}/model.safetensors")["size"] == len(data)


def test_preupload_upload_modes(alice, hub):
    repo_id = unique_repo("modes")
    alice.create_repo(repo_id)
    text_sample = base64.b64encode(b"plain text").decode()
    files = [
        {"path": "small.txt", "sample": text_sample, "size": 10},
        {"path": "big.txt", "sample": text_sample, "size": LFS_SIZE_THRESHOLD + 1},
        {"path": "data/train.parquet", "sample": text_sample, "size": 10},
        {"path": "blob.dat", "sample": base64.b64encode(b"ab\x00cd").decode(), "size": 5},
    ]
    resp = _http("POST", f"{hub.url}/api/models/{repo_id}/preupload/main", json_body={"files": files},
                 headers={"Authorization": f"Bearer {ALICE_TOKEN}"})
    assert resp.status_code == 200
    modes = {f["path"]: f["uploadMode"] for f in resp.json()["files"]}
    assert modes == {"small.txt": "regular", "big.txt": "lfs", "data/train.parquet": "lfs", "blob.dat": "lfs"}


def test_lfs_upload_rejects_wrong_content(alice, hub):
    repo_id = unique_repo("lfsbad")
    alice.create_repo(repo_id)
    content = b"x" * 100
    oid = hashlib.sha256(content).hexdigest()
    batch = _http(
        "POST",
        f"{hub.url}/{repo_id}.git/info/lfs/objects/batch",
        json_body={"operation": "upload", "objects": [{"oid": oid, "size": 100}], "hash_algo": "sha256"},
        headers={"Authorization": f"Bearer {ALICE_TOKEN}"},
    ).json()
    href = batch["objects"][0]["actions"]["upload"]["href"]
    assert href.startswith(hub.url)
    assert _http("PUT", href, content=b"y" * 100).status_code == 400
    assert _http("PUT", href, content=content).status_code == 200
    verify = batch["objects"][0]["actions"]["verify"]["href"]
    assert _http("POST", verify, json_body={"oid": oid, "size": 100}).status_code == 200
    # anonymous callers cannot ask for upload slots
    anon = _http("POST", f"{hub.url}/{repo_id}.git/info/lfs/objects/batch",
                 json_body={"operation": "upload", "objects": [{"oid": oid, "size": 100}]})
    assert anon.status_code == 401


def test_branch_tag_commits_and_revisions(alice, tmp_path):
    repo_id = unique_repo("revs")
    alice.create_repo(repo_id)
    first = alice.upload_file(path_or_fileobj=b"v1", path_in_repo="f.txt", repo_id=repo_id).oid
    alice.create_tag(repo_id, tag="v1.0")
    alice.create_branch(repo_id, branch="dev")
    alice.upload_file(path_or_fileobj=b"dev", path_in_repo="f.txt", repo_id=repo_id, revision="dev")
    alice.upload_file(path_or_fileobj=b"v2", path_in_repo="f.txt", repo_id=repo_id)

    def get(revision):
        return _read(hf_hub_download(repo_id, "f.txt", revision=revision, cache_dir=tmp_path, token=ALICE_TOKEN))

    assert (get("main"), get("dev"), get("v1.0"), get(first)) == (b"v2", b"dev", b"v1", b"v1")
    refs = alice.list_repo_refs(repo_id)
    assert {b.name for b in refs.branches} == {"main", "dev"}
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1.0", first)]
    titles = [c.title for c in alice.list_repo_commits(repo_id, revision="dev")]
    assert titles == ["Upload f.txt with huggingface_hub"] * 2 + ["initial commit"]
    with pytest.raises(HfHubHTTPError) as err:
        alice.create_branch(repo_id, branch="dev")
    assert err.value.response.status_code == 409
    alice.create_branch(repo_id, branch="dev", exist_ok=True)
    alice.delete_branch(repo_id, branch="dev")
    assert {b.name for b in alice.list_repo_refs(repo_id).branches} == {"main"}


def test_commit_with_stale_parent_is_rejected(alice):
    repo_id = unique_repo("parent")
    alice.create_repo(repo_id)
    base = alice.repo_info(repo_id).sha
    alice.upload_file(path_or_fileobj=b"a", path_in_repo="a.txt", repo_id=repo_id)
    with pytest.raises(HfHubHTTPError) as err:
        alice.create_commit(repo_id, [CommitOperationAdd("b.txt", b"b")], commit_message="late",
                            parent_commit=base)
    assert err.value.response.status_code == 412
    alice.delete_file("a.txt", repo_id)
    assert "a.txt" not in alice.list_repo_files(repo_id)


def test_upload_folder_single_commit(alice, tmp_path):
    repo_id = unique_repo("folder", user="alice")
    alice.create_repo(repo_id, repo_type="dataset")
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "a.json").write_text("{}")
    (tmp_path / "src" / "sub" / "b.parquet").write_bytes(b"PAR1" + os.urandom(100))
    before = len(alice.list_repo_commits(repo_id, repo_type="dataset"))
    alice.upload_folder(folder_path=tmp_path / "src", repo_id=repo_id, repo_type="dataset")
    assert len(alice.list_repo_commits(repo_id, repo_type="dataset")) == before + 1
    assert sorted(alice.list_repo_files(repo_id, repo_type="dataset")) == [".gitattributes", "a.json",
                                                                            "sub/b.parquet"]
    info = alice.dataset_info(repo_id)
    assert info.id == repo_id and info.private is False


def test_private_repo_access(alice, hub, tmp_path):
    repo_id = unique_repo("private")
    alice.create_repo(repo_id, private=True)
    alice.upload_file(path_or_fileobj=b"secret", path_in_repo="s.txt", repo_id=repo_id)
    assert _read(hf_hub_download(repo_id, "s.txt", cache_dir=tmp_path / "a", token=ALICE_TOKEN)) == b"secret"
    with pytest.raises(RepositoryNotFoundError) as err:
        hf_hub_download(repo_id, "s.txt", cache_dir=tmp_path / "anon", token=False)
    assert err.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "s.txt", cache_dir=tmp_path / "bob", token=BOB_TOKEN)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=False).model_info(repo_id)
    alice.update_repo_settings(repo_id, private=False)
    assert _read(hf_hub_download(repo_id, "s.txt", cache_dir=tmp_path / "anon2", token=False)) == b"secret"


def test_wrong_token_and_foreign_namespace_denied(alice, hub, tmp_path):
    repo_id = unique_repo("denied")
    alice.create_repo(repo_id)
    wrong = HfApi(endpoint=hub.url, token="hf_not_a_valid_token")
    with pytest.raises(HfHubHTTPError) as err:
        wrong.whoami()
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as err:
        wrong.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError):
        hf_hub_download(repo_id, ".gitattributes", cache_dir=tmp_path, token="hf_not_a_valid_token")
    bob = HfApi(endpoint=hub.url, token=BOB_TOKEN)
    with pytest.raises(HfHubHTTPError) as err:
        bob.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        bob.create_repo(unique_repo("stolen", user="alice"))
    assert err.value.response.status_code == 403
    assert alice.list_repo_files(repo_id) == [".gitattributes"]


def test_whoami_and_repo_without_namespace(alice):
    me = alice.whoami()
    assert me["name"] == "alice" and me["type"] == "user"
    name = unique_repo("nonamespace").split("/")[1]
    assert alice.create_repo(name).repo_id == f"alice/{name}"


def test_delete_repo_and_missing_errors(alice, tmp_path):
    repo_id = unique_repo("gone")
    alice.create_repo(repo_id)
    with pytest.raises(HfHubHTTPError) as err:
        alice.create_repo(repo_id)
    assert err.value.response.status_code == 409
    assert alice.create_repo(repo_id, exist_ok=True).repo_id == repo_id
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, ".gitattributes", revision="no-such-branch", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        alice.repo_info(repo_id, revision="0" * 40)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.txt", cache_dir=tmp_path)
    alice.delete_repo(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        alice.repo_info(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, ".gitattributes", cache_dir=tmp_path / "fresh")
    alice.delete_repo(repo_id, missing_ok=True)
    with pytest.raises(RepositoryNotFoundError):
        alice.delete_repo(repo_id)


def test_only_loopback_clients_and_persistent_storage(tmp_path):
    with HubServer(tokens={"t": "carol"}, storage_dir=str(tmp_path / "store")) as server:
        assert server._httpd.verify_request(None, ("127.0.0.1", 5000))
        assert not server._httpd.verify_request(None, ("10.1.2.3", 5000))
        api = HfApi(endpoint=server.url, token="t")
        api.create_repo("carol/kept")
        api.upload_file(path_or_fileobj=b"persist", path_in_repo="p.txt", repo_id="carol/kept")
    assert not server.running
    with HubServer(tokens={"t": "carol"}, storage_dir=str(tmp_path / "store")) as server:
        path = hf_hub_download("carol/kept", "p.txt", cache_dir=tmp_path / "c", endpoint=server.url)
        assert _read(path) == b"persist"
