"""The ``fake_hub`` fixture: a running FakeHub that this process's Hub clients talk to.

tests/conftest.py registers this module as a plugin, so any test can ask for it:

    def test_push(fake_hub):
        HfApi().upload_folder(repo_id="user/name", folder_path=...)   # no endpoint, no token
        assert "config.json" in fake_hub.files("user/name")

Setting the environment is not enough in this process: conftest.py sets HF_HUB_OFFLINE=1 before
huggingface_hub is imported, and huggingface_hub copies its environment into
``huggingface_hub.constants`` once, at import; ``huggingface_hub.upload_folder`` & co. are bound
to an ``HfApi`` built then, and transformers caches its own ``HfApi``. So the fixture sets the
environment (for subprocesses started by the test) *and* patches those copies; monkeypatch
restores everything afterwards.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants
from huggingface_hub.hf_api import api as default_api
from huggingface_hub.utils import _http

from tests.fake_hub import FakeHub


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A started FakeHub; huggingface_hub, transformers and peft in this process use it."""
    hub = FakeHub(home=tmp_path / "hf_home_subprocess").start()
    home = tmp_path / "hf_home"
    env = hub.env(home)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    point_client_at(hub.url, home=env["HF_HOME"], monkeypatch=monkeypatch)
    try:
        yield hub
    finally:
        hub.stop()
        _forget_clients()


def point_client_at(endpoint: str, *, home: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the already imported huggingface_hub (and transformers) of this process use ``endpoint``,
    online, without Xet, with caches and login under ``home``."""
    patches = {  # leaving any of the first four out breaks the calls named beside it (checked)
        "ENDPOINT": endpoint,  # HfApi(), the commit and LFS APIs read it at call time
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",  # hf_hub_url
        "HF_HUB_OFFLINE": False,  # is_offline_mode(): the request hook, transformers and peft ask it
        "HF_HUB_DISABLE_XET": True,  # hf_xet is installed: without this, uploads and downloads go to Xet
        # Isolation, not reachability: downloads and login files go under ``home``, not ~/.cache.
        "HF_HUB_CACHE": f"{home}/hub",
        "HF_HOME": home,
        "HF_TOKEN_PATH": f"{home}/token",
        "HF_STORED_TOKENS_PATH": f"{home}/stored_tokens",
    }
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value)
    # huggingface_hub.upload_folder, create_repo, ... are methods of this instance, built at import.
    monkeypatch.setattr(default_api, "endpoint", endpoint)
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None:  # its shared HfApi keeps the endpoint it was built with
        monkeypatch.setattr(transformers_hub, "_hf_api", None)
    _http.close_session()  # no pooled connections from before


def _forget_clients() -> None:
    """Drop what was built against the fake endpoint during the test (a transformers import
    inside the test is not undone by monkeypatch) and the pooled connections to the stopped server."""
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None:
        transformers_hub._hf_api = None
    _http.close_session()
