"""The fake Hub behaves as the real huggingface_hub client expects (driven only through the client)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub import (
    HfApi,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from transformers import LlamaConfig, LlamaForCausalLM

from tests.fake_hub import FakeHub

REPO = "user/tiny"
# huggingface_hub's LFS upload passes the file as ``data=``, which httpx2 deprecates: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


def _folder(path: Path, **files: bytes) -> Path:
    """A folder holding ``files`` (name -> content; ``__`` in a name stands for ``/``)."""
    for name, content in files.items():
        target = path / name.replace("__", "/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    return path


def _status(error: pytest.ExceptionInfo) -> int:
    return error.value.response.status_code


def test_create_repo_conflicts_unless_exist_ok(fake_hub: FakeHub) -> None:
    api = HfApi()
    url = api.create_repo(REPO)
    assert (url.repo_id, url.endpoint) == (REPO, fake_hub.url)
    with pytest.raises(HfHubHTTPError) as error:
        api.create_repo(REPO)
    assert _status(error) == 409
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    assert huggingface_hub.create_repo("no-namespace").repo_id == "user/no-namespace"  # whoami's user
    assert fake_hub.repos() == ["user/no-namespace", REPO] and not fake_hub.is_private(REPO)
    assert [c["message"] for c in fake_hub.commits(REPO)] == ["initial commit"]  # as the Hub does
    assert api.whoami()["name"] == "user"


def test_private_repo_is_invisible_without_the_token(fake_hub: FakeHub, tmp_path: Path) -> None:
    api, anonymous = HfApi(), HfApi(token=False)
    api.create_repo(REPO, private=True)
    api.upload_folder(repo_id=REPO, folder_path=_folder(tmp_path, **{"config.json": b"{}"}))
    assert fake_hub.is_private(REPO)
    assert api.repo_exists(REPO) and api.model_info(REPO).private
    assert not anonymous.repo_exists(REPO)
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info(REPO)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(REPO, "config.json", token=False)
    assert Path(hf_hub_download(REPO, "config.json")).read_bytes() == b"{}"


def test_upload_folder_regular_and_lfs_files_download_identical(fake_hub: FakeHub, tmp_path: Path) -> None:
    files = {
        "config.json": b'{"model_type": "llama"}',
        "model.safetensors": os.urandom(4096),  # LFS by name
        "big.txt": b"x" * 1_100_000,  # LFS by size
        "sub__notes.txt": b"hello",
    }
    folder = _folder(tmp_path / "src", **files)
    huggingface_hub.create_repo(REPO)
    info = huggingface_hub.upload_folder(repo_id=REPO, folder_path=folder, commit_message="add model")
    expected = {name.replace("__", "/"): content for name, content in files.items()}

    assert {p: c for p, c in fake_hub.files(REPO).items() if p != ".gitattributes"} == expected
    assert fake_hub.commits(REPO)[0] == {"id": info.oid, "message": "add model"}
    assert [m for m, p in fake_hub.requests if p.startswith("/__lfs__/upload/")] == ["PUT", "PUT"]
    siblings = {s.rfilename: s for s in HfApi().model_info(REPO, files_metadata=True).siblings}
    assert siblings["model.safetensors"].lfs.sha256 == hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert siblings["big.txt"].lfs is not None and siblings["config.json"].lfs is None
    assert {e.path for e in HfApi().list_repo_tree(REPO)} == {".gitattributes", "config.json",
                                                              "model.safetensors", "big.txt", "sub"}

    meta = get_hf_file_metadata(hf_hub_url(REPO, "model.safetensors"))
    assert (meta.commit_hash, meta.etag, meta.size) == (info.oid, siblings["model.safetensors"].lfs.sha256, 4096)
    for path, content in expected.items():
        assert Path(hf_hub_download(REPO, path)).read_bytes() == content, path
    snapshot = Path(snapshot_download(REPO, cache_dir=tmp_path / "snapshots"))
    assert all((snapshot / p).read_bytes() == c for p, c in expected.items())

    again = huggingface_hub.upload_folder(repo_id=REPO, folder_path=folder)  # unchanged: no new commit
    assert again.oid == info.oid and len(fake_hub.commits(REPO)) == 2


def test_branch_commit_and_download_at_revision(fake_hub: FakeHub, tmp_path: Path) -> None:
    api = HfApi()
    api.create_repo(REPO)
    main = api.upload_folder(repo_id=REPO, folder_path=_folder(tmp_path / "v1", **{"model.safetensors": b"v1"}))
    api.create_branch(REPO, branch="step-1")
    with pytest.raises(HfHubHTTPError) as error:
        api.create_branch(REPO, branch="step-1")
    assert _status(error) == 409
    api.create_branch(REPO, branch="step-1", exist_ok=True)
    step = api.upload_folder(repo_id=REPO, revision="step-1",
                             folder_path=_folder(tmp_path / "v2", **{"model.safetensors": b"v2"}))

    assert fake_hub.branches(REPO) == {"main": main.oid, "step-1": step.oid}
    assert {b.name: b.target_commit for b in api.list_repo_refs(REPO).branches} == fake_hub.branches(REPO)
    assert fake_hub.files(REPO)["model.safetensors"] == b"v1"
    assert fake_hub.files(REPO, "step-1")["model.safetensors"] == b"v2"
    assert api.model_info(REPO, revision="step-1").sha == step.oid
    assert Path(hf_hub_download(REPO, "model.safetensors", revision="step-1")).read_bytes() == b"v2"
    assert Path(hf_hub_download(REPO, "model.safetensors")).read_bytes() == b"v1"
    assert Path(hf_hub_download(REPO, "model.safetensors", revision=main.oid)).read_bytes() == b"v1"
    assert (Path(snapshot_download(REPO, revision="step-1")) / "model.safetensors").read_bytes() == b"v2"


def test_missing_repo_revision_and_file_raise_the_client_exceptions(fake_hub: FakeHub, tmp_path: Path) -> None:
    api = HfApi()
    api.create_repo(REPO)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/missing", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("user/missing")
    with pytest.raises(RepositoryNotFoundError):
        api.upload_folder(repo_id="user/missing", folder_path=_folder(tmp_path, **{"a.txt": b"a"}))
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, ".gitattributes", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.upload_folder(repo_id=REPO, revision="no-such-branch", folder_path=tmp_path)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "config.json")
    with pytest.raises(EntryNotFoundError):
        api.list_repo_tree(REPO, path_in_repo="no/such/folder").__next__()
    assert not api.file_exists(REPO, "config.json") and api.file_exists(REPO, ".gitattributes")


def test_writes_need_the_token(fake_hub: FakeHub, tmp_path: Path) -> None:
    for api in (HfApi(token="hf_wrong"), HfApi(token=False)):
        with pytest.raises(HfHubHTTPError) as error:
            api.create_repo(REPO)
        assert _status(error) == 401 and not isinstance(error.value, RepositoryNotFoundError)
    assert not fake_hub.repo_exists(REPO)
    HfApi().create_repo(REPO)
    with pytest.raises(HfHubHTTPError) as error:
        HfApi(token=False).upload_folder(repo_id=REPO, folder_path=_folder(tmp_path, **{"a.txt": b"a"}))
    assert _status(error) == 401
    with pytest.raises(HfHubHTTPError) as error:
        HfApi(token="hf_wrong").whoami()
    assert _status(error) == 401
    with pytest.raises(HfHubHTTPError) as error:  # like the Hub: a wrong token fails even public reads
        hf_hub_download(REPO, ".gitattributes", token="hf_wrong")
    assert _status(error) == 401
    assert len(fake_hub.commits(REPO)) == 1


def test_injected_500_on_commit_leaves_no_commit_and_no_visible_lfs_file(fake_hub: FakeHub, tmp_path: Path) -> None:
    folder = _folder(tmp_path, **{"model.safetensors": b"weights", "config.json": b"{}"})
    HfApi().create_repo(REPO)
    fake_hub.fail(500, method="POST", path_contains="/commit/")
    with pytest.raises(HfHubHTTPError, match="injected failure") as error:
        HfApi().upload_folder(repo_id=REPO, folder_path=folder)
    assert _status(error) == 500
    assert list(fake_hub.files(REPO)) == [".gitattributes"] and len(fake_hub.commits(REPO)) == 1
    with pytest.raises(EntryNotFoundError):  # uploaded to LFS, but no commit references it
        hf_hub_download(REPO, "model.safetensors")
    HfApi().upload_folder(repo_id=REPO, folder_path=folder)  # the fault was used up
    assert fake_hub.files(REPO)["model.safetensors"] == b"weights"


def test_dropped_connection_on_commit_raises_and_leaves_no_commit(fake_hub: FakeHub, tmp_path: Path) -> None:
    HfApi().create_repo(REPO)
    fake_hub.drop(path_contains="/commit/")
    with pytest.raises(httpx2.TransportError):  # not an HfHubHTTPError: there was no response
        HfApi().upload_folder(repo_id=REPO, folder_path=_folder(tmp_path, **{"config.json": b"{}"}))
    assert list(fake_hub.files(REPO)) == [".gitattributes"] and len(fake_hub.commits(REPO)) == 1


def test_dropped_lfs_upload_is_retried_by_the_client(fake_hub: FakeHub, tmp_path: Path) -> None:
    HfApi().create_repo(REPO)
    fake_hub.drop(method="PUT")
    HfApi().upload_folder(repo_id=REPO, folder_path=_folder(tmp_path, **{"model.safetensors": os.urandom(200_000)}))
    assert [m for m, _ in fake_hub.requests].count("PUT") == 2  # http_backoff retried after 1 s
    assert len(fake_hub.files(REPO)["model.safetensors"]) == 200_000


def _tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_pushed_llama_loads_with_from_pretrained_at_each_revision(fake_hub: FakeHub, tmp_path: Path) -> None:
    """transformers downloads through the fake Hub (a fresh interpreter doing the same, through
    ``hub.env()``, is what every round trip in test_hub_push.py does)."""
    ids = torch.tensor([[1, 5, 9, 2, 33, 7]])
    logits = {}
    HfApi().create_repo(REPO)
    for revision, seed in (("main", 0), ("step-1", 1)):
        model = _tiny_llama(seed)
        model.save_pretrained(tmp_path / revision)
        if revision != "main":
            HfApi().create_branch(REPO, branch=revision)
        huggingface_hub.upload_folder(repo_id=REPO, folder_path=tmp_path / revision, revision=revision)
        with torch.no_grad():
            logits[revision] = model(ids).logits[0]

    for revision, expected in logits.items():
        here = LlamaForCausalLM.from_pretrained(REPO, revision=revision).eval()
        with torch.no_grad():
            assert torch.equal(here(ids).logits[0], expected), revision
    downloads = sum(p.endswith("/model.safetensors") and m == "GET" for m, p in fake_hub.requests)
    assert downloads == 2  # both revisions really came over HTTP
