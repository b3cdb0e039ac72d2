"""Publishing to the Hugging Face Hub: one folder (``lmforge push``), and the pushes of a run.

    push_folder(folder, "user/name")     one commit of a model, LoRA adapter or tokenizer folder
    BackgroundPusher("user/name", ...)   pushes from a worker thread, with retries, for training
    RunPublisher(...)                    the model card and pushes of a training run (RunHooks)

What is pushed is what a reader needs to load the folder: safetensors weights, config (with its
``auto_map``) and the self-contained model code, tokenizer files, generation config, adapter files
and the model card, whose "## Load" section is rewritten to name the repo (and branch). Files are
staged in a temporary folder, so nothing in the user's folder changes.

The token is never handled here: ``huggingface_hub`` reads it from ``HF_TOKEN`` or the login
cache and sends it in a request header. No message, log line or file written here contains it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import queue
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from accelerate import PartialState
from huggingface_hub import HfApi, ModelCard, constants, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import HFValidationError, validate_repo_id
from tqdm.auto import tqdm

from lmforge.errors import LmforgeError
from lmforge.eval.harness import HARNESS_RESULTS
from lmforge.export.convert import convert_folder
from lmforge.publish.cards import (
    build_card,
    folder_facts,
    retarget,
    run_facts,
    with_harness_results,
    write_card,
)
from lmforge.runs import (
    builtin_hub_id,
    find_model,
    has_tokenizer,
    is_local_path,
    link_or_copy,
    read_json,
)
from lmforge.train.hooks import Export, RunHooks, RunSummary

# the files of a folder that are published (hidden files, pickles, optimizer states never are)
PUSHED_FILES = ("*.safetensors", "*.json", "*.py", "*.txt", "*.model", "*.jinja", "README.md", "*.png")
# weights a revision keeps only if this push writes them again (no stale shards next to new ones)
STALE_WEIGHTS = ("*.safetensors", "*.safetensors.index.json")
# seconds to wait before each retry of a failed background push
RETRY_DELAYS = (5.0, 30.0)
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_BRANCH = re.compile(r"[\w][\w.-]*(?:/[\w.-]+)*")


class HubAuthError(LmforgeError):
    """The Hub refused the token (or there is none): retrying cannot help."""


@dataclass
class PushResult:
    """A confirmed commit: the Hub answered with its id."""

    repo_id: str
    revision: str
    commit_id: str
    url: str
    kind: str
    files: list[str]


# ----------------------------------------------------------------------------------- checks


def check_repo_id(repo_id: str, what: str = "REPO_ID") -> str:
    """``repo_id`` if it is ``USER/NAME`` as the Hub accepts it, else an error saying what is wrong."""
    problem = None
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id):
        problem = "it must be USER/NAME (or ORG/NAME): letters, digits, '-', '_' and '.', one '/'"
    else:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as e:
            problem = str(e).split("\n")[0]
    if problem:
        raise LmforgeError(f"{what}: {repo_id!r} is not a Hub repo id: {problem}")
    return repo_id


def check_branch(revision: str) -> str:
    if not _BRANCH.fullmatch(revision) or ".." in revision or revision.endswith((".", ".lock")):
        raise LmforgeError(f"--revision: {revision!r} is not a valid branch name (e.g. main, step-1000, v1)")
    return revision


def check_model_id(name: str, what: str) -> str:
    """A model named on the Hub: ``USER/NAME`` checked as a repo id, a bare name (``gpt2``) as it is."""
    return check_repo_id(name, what) if "/" in name else name


def repo_name(model_id: str) -> str:
    """``user/name@branch`` -> ``name``."""
    return model_id.partition("@")[0].split("/")[-1]


def find_publishable(folder: str | Path) -> tuple[Path, str]:
    """(the folder to push, its kind: ``model``, ``adapter`` or ``tokenizer``) for any folder
    lmforge wrote (a run or quickstart folder stands for its model) or a tokenizer folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LmforgeError(f"{folder}: no such folder")
    if has_tokenizer(folder) and not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        return folder, "tokenizer"
    try:
        found = find_model(folder, what="MODEL")
    except LmforgeError as e:
        raise LmforgeError(f"{e}; lmforge push takes a model (config.json + *.safetensors), a LoRA adapter "
                           "(adapter_config.json), a tokenizer (tokenizer.json) or a folder lmforge wrote") from None
    folder = found.path
    if found.is_adapter:
        if not (folder / "adapter_model.safetensors").is_file():
            raise LmforgeError(f"{folder}: adapter_config.json but no adapter_model.safetensors (lmforge "
                               "publishes safetensors weights only)")
        return folder, "adapter"
    if not any(folder.glob("*.safetensors")):
        raise LmforgeError(f"{folder}: config.json but no *.safetensors weights (lmforge publishes "
                           "safetensors only; re-save with save_pretrained(..., safe_serialization=True))")
    return folder, "model"


def hub_id_of(base: str, *, base_model: str | None, what: str) -> str | None:
    """The Hub id that names the model ``base`` on the Hub: ``base_model`` when given (checked;
    ``what`` names it in messages), a built-in model's Hub id, ``base`` itself when it is a Hub id;
    None for a folder on this disk (nobody else has it)."""
    if base_model:
        return check_model_id(base_model, what)
    return builtin_hub_id(base) or (base if base and not is_local_path(base) else None)


def pushed_adapter_base(folder: Path, base_model: str | None) -> str:
    """The Hub id a pushed adapter names as its base (``hub_id_of`` its recorded
    ``base_model_name_or_path``); an adapter of a folder on this disk is refused."""
    recorded = read_json(folder / "adapter_config.json").get("base_model_name_or_path") or ""
    hub_id = hub_id_of(recorded, base_model=base_model, what="--hub-base-model")
    if hub_id is None:
        raise LmforgeError(
            f"{folder}/adapter_config.json: the adapter's base model is {recorded!r}, a folder on this disk that "
            "nobody who downloads the adapter has. Publish the base first (lmforge push BASE_DIR USER/BASE) "
            "and name it with --hub-base-model USER/BASE")
    return hub_id


# ----------------------------------------------------------------------------------- staging


def _published(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and any(fnmatch(p.name, pattern) for pattern in PUSHED_FILES))


def _rewrite(path: Path, text: str) -> None:
    """Replace a staged file's content without touching a hard-linked original."""
    path.unlink(missing_ok=True)
    path.write_text(text)


def stage(folder: Path, kind: str, target: Path, model_id: str, *, to_hf: bool = False,
          base_model: str | None = None) -> Path:
    """Lay out in ``target`` (which must not exist) the files to push for ``folder``, with the model
    card naming ``model_id`` (``repo`` or ``repo@branch``), converted to stock classes with ``to_hf``."""
    if to_hf:
        if kind != "model":
            raise LmforgeError(f"--to-hf converts a model to stock transformers classes; {folder} is a {kind} "
                               "folder" + (" (merge it first: lmforge merge)" if kind == "adapter" else ""))
        convert_folder(folder, target, to_hf=True)
        for name in ("README.md", "loss.png", "eval_results.json", HARNESS_RESULTS):
            if (folder / name).is_file() and not (target / name).exists():
                shutil.copy2(folder / name, target / name)
    else:
        target.mkdir(parents=True)
        for path in _published(folder):
            link_or_copy(path, target / path.name)
    card_path = target / "README.md"
    if kind == "adapter":
        base_model = pushed_adapter_base(folder, base_model)
        adapter_config = json.loads((target / "adapter_config.json").read_text())
        adapter_config["base_model_name_or_path"] = base_model
        _rewrite(target / "adapter_config.json", json.dumps(adapter_config, indent=2) + "\n")
    if card_path.is_file():
        card = ModelCard(retarget(card_path.read_text(), target, model_id))
        local_base = card.data.base_model if isinstance(card.data.base_model, str) else None
        if local_base and is_local_path(local_base):  # a path on this disk means nothing on the Hub
            card.data.base_model = base_model
            if base_model:
                card.text = card.text.replace(f"`{local_base}`", f"`{base_model}`")
        if to_hf:
            card.data.library_name = "transformers"
        card = with_harness_results(card, target)  # benchmarks run since the card was written
        if card.data.eval_results:
            card.data.model_name = repo_name(model_id)
    else:
        card = ModelCard(retarget(str(build_card(target, folder_facts(target))), target, model_id))
    _rewrite(card_path, str(card))
    return target


# ----------------------------------------------------------------------------------- pushing


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level exceptions of whichever HTTP library this huggingface_hub uses."""
    found: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            found.append(importlib.import_module(name).HTTPError)
    return tuple(found)


@contextlib.contextmanager
def hub_errors(what: str) -> Iterator[None]:
    """Turn the client's exceptions into one clear ``LmforgeError`` (``HubAuthError`` for a refused
    token), saying that nothing was committed."""
    tail = "; the Hub confirmed no commit, so nothing from this push was published"
    transport = _transport_errors()
    try:
        yield
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        detail = (e.server_message or str(e).split("\n")[0]).strip()
        if status in (401, 403):
            raise HubAuthError(f"{what}: the Hub refused the token (HTTP {status}: {detail}). Log in with "
                               "`hf auth login` or set HF_TOKEN to a token with write access" + tail) from None
        raise LmforgeError(f"{what}: HTTP {status}: {detail}{tail}") from None
    except (*transport, RuntimeError) as e:
        cause = e if isinstance(e, transport) else e.__cause__  # the client wraps failed LFS uploads
        if not isinstance(cause, transport):
            raise
        raise LmforgeError(f"{what}: the connection to {constants.ENDPOINT} failed ({type(cause).__name__}: "
                           f"{cause}){tail}") from None


def _validate_card(path: Path) -> None:
    """The Hub's own check of the card's metadata (``/api/validate-yaml``), before anything is
    created or committed: the Hub refuses a commit whose README metadata it cannot read."""
    try:
        ModelCard.load(path).validate()
    except ValueError as e:
        raise LmforgeError(f"{path.name}: the Hub rejects the model card's metadata ({str(e).strip()[:300]}); "
                           "fix the card (e.g. the license: key of the training config); nothing was pushed") from None


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, to_hf: bool = False, base_model: str | None = None,
                kind: str | None = None) -> PushResult:
    """Push a model, LoRA adapter or tokenizer folder (or a run folder's ``final/``) to ``repo_id``
    as one commit on ``revision`` (a branch, created from main if missing). Returns the commit."""
    check_repo_id(repo_id)
    revision = check_branch(revision) if revision else "main"
    if kind is None:
        folder, kind = find_publishable(folder)
    folder = Path(folder)
    check_token()
    model_id = repo_id if revision == "main" else f"{repo_id}@{revision}"
    api = HfApi()
    with tempfile.TemporaryDirectory(prefix="lmforge-push-") as tmp:
        staged = stage(folder, kind, Path(tmp) / "repo", model_id, to_hf=to_hf, base_model=base_model)
        files = sorted(p.name for p in staged.iterdir())
        message = commit_message or f"Upload {kind} with lmforge" + (" (stock transformers classes)" if to_hf else "")
        with hub_errors(f"push {folder} to {repo_id} ({revision})"):
            _validate_card(staged / "README.md")
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=staged, revision=revision,
                                     commit_message=message,
                                     delete_patterns=list(STALE_WEIGHTS) if kind != "tokenizer" else None)
    url = f"{constants.ENDPOINT}/{repo_id}" + (f"/tree/{revision}" if revision != "main" else "")
    return PushResult(repo_id, revision, info.oid, url, kind, files)


# ----------------------------------------------------------------------------------- during training


@dataclass
class PushOutcome:
    revision: str
    folder: Path
    result: PushResult | None = None
    error: str | None = None
    attempts: int = 0


class BackgroundPusher:
    """Pushes folders to one repo from a worker thread, in submission order, so that training
    never waits on the network. Each push is tried ``1 + len(RETRY_DELAYS)`` times (a refused
    token only once); a push that still fails is recorded, never raised. ``finish()`` waits for
    every push and returns what happened to each."""

    def __init__(self, repo_id: str, *, private: bool = False, base_model: str | None = None,
                 log: Callable[[str], None] | None = None):
        self.repo_id = check_repo_id(repo_id, "push_to_hub")
        self.private, self.base_model = private, base_model
        self.log = log or _write
        self.outcomes: list[PushOutcome] = []
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="lmforge-hub-push", daemon=True)
        self._thread.start()

    def submit(self, folder: Path, revision: str, message: str, *, cleanup: bool = False) -> None:
        """Queue ``folder`` for ``revision``; with ``cleanup`` the folder is deleted once pushed (or given up)."""
        self._jobs.put((Path(folder), revision, message, cleanup))

    def finish(self) -> list[PushOutcome]:
        self._jobs.put(None)
        self._thread.join()
        return self.outcomes

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            folder, revision, message, cleanup = job
            outcome = PushOutcome(revision, folder)
            try:
                self._push(outcome, message)
            finally:
                if cleanup:
                    shutil.rmtree(folder, ignore_errors=True)
            self.outcomes.append(outcome)

    def _push(self, outcome: PushOutcome, message: str) -> None:
        for delay in (*RETRY_DELAYS, None):
            outcome.attempts += 1
            try:
                outcome.result = push_folder(outcome.folder, self.repo_id, private=self.private,
                                             revision=outcome.revision, commit_message=message,
                                             base_model=self.base_model)
                outcome.error = None
                self.log(f"hub: pushed {outcome.revision} -> {outcome.result.url} (commit {outcome.result.commit_id[:10]})")
                return
            except HubAuthError as e:
                outcome.error = str(e)
                break
            except LmforgeError as e:
                outcome.error = str(e)
            except Exception as e:  # noqa: BLE001 - a push must never break training
                outcome.error = f"{type(e).__name__}: {e}"
            if delay is None:
                break
            self.log(f"hub: push of {outcome.revision} failed (attempt {outcome.attempts}); retrying in {delay:g} s")
            time.sleep(delay)
        self.log(f"hub: giving up on {outcome.revision} after {outcome.attempts} attempt(s): {outcome.error}")


def _write(line: str) -> None:
    tqdm.write(line)


def summary_of_pushes(repo_id: str, outcomes: list[PushOutcome]) -> str:
    """What a training run pushed and did not push, for its last lines."""
    done = [o for o in outcomes if o.result is not None]
    failed = [o for o in outcomes if o.result is None]
    lines = []
    if done:
        lines.append(f"hub: pushed to {repo_id}: " + ", ".join(f"{o.revision} ({o.result.commit_id[:10]})" for o in done))
    for o in failed:
        lines.append(f"hub: NOT pushed: {o.revision} ({o.folder}) after {o.attempts} attempt(s): {o.error}")
    if not outcomes:
        lines.append(f"hub: nothing was pushed to {repo_id}")
    return "\n".join(lines)


def check_token() -> None:
    if get_token() is None:
        raise HubAuthError("no Hugging Face token found: set HF_TOKEN or run `hf auth login` (a token with "
                           "write access); nothing was pushed")


def hub_base_model(model_path: str, *, method: str, base_model: str | None) -> str | None:
    """The Hub id a fine-tuned model's card (and a LoRA adapter's config) names as its base
    (``hub_id_of`` model.path); None for a full fine-tune of a local folder. A LoRA adapter on a
    local base without ``base_model`` is refused (before training: nobody who downloads the adapter
    could load it)."""
    hub_id = hub_id_of(model_path, base_model=base_model, what="hub_base_model")
    if hub_id is None and method == "lora":
        raise LmforgeError(
            f"push_to_hub with method lora: the base model.path {model_path!r} is a folder on this disk, "
            f"which nobody who downloads the adapter has. Publish the base first (lmforge push {model_path} "
            "USER/BASE) and set hub_base_model: USER/BASE (--hub-base-model)")
    return hub_id  # a full fine-tune of a local folder stands alone: its card names no base on the Hub


class RunPublisher(RunHooks):
    """The publishing side of a training run: the model card of its final model and, with
    ``push_to_hub``, a branch per saved checkpoint (``push_checkpoints``), the final model on main
    and the closing summary of what was and was not pushed.

    Pushes run on the main process's worker thread; the other processes only take part in
    exporting a (sharded) checkpoint. ``is_main`` (None: asked of accelerate when the run first
    calls a hook, once the launch's processes are set up). Construct it after ``check``."""

    def __init__(self, *, is_main: bool | None = None, push_to_hub: str | None = None,
                 push_checkpoints: bool = False, hub_private: bool = False, base_model: str | None = None):
        self._is_main, self.push_checkpoints = is_main, push_checkpoints
        self.repo = (push_to_hub, hub_private, base_model)
        self._pusher: BackgroundPusher | None = None

    @property
    def is_main(self) -> bool:
        if self._is_main is None:
            self._is_main = PartialState().is_main_process
        return self._is_main

    @property
    def pusher(self) -> BackgroundPusher | None:
        """The main process's pusher (started on first use), None elsewhere or without push_to_hub."""
        repo_id, private, base_model = self.repo
        if self._pusher is None and repo_id and self.is_main:
            self._pusher = BackgroundPusher(repo_id, private=private, base_model=base_model)
        return self._pusher

    @staticmethod
    def check(push_to_hub: str | None, push_checkpoints: bool) -> None:
        """Before anything is written: a valid repo id and a token (a long run must not find out at its end)."""
        if push_checkpoints and not push_to_hub:
            raise LmforgeError("push_checkpoints needs push_to_hub: USER/NAME (the repo to push the branches to)")
        if push_to_hub:
            check_repo_id(push_to_hub, "push_to_hub")
            check_token()

    def on_checkpoint(self, trainer: Any, checkpoint: Path, export: Export) -> None:
        """Export the checkpoint's model with its card and queue it for branch ``step-N``."""
        if not self.push_checkpoints:
            return
        step = trainer.state.step
        folder = Path(tempfile.mkdtemp(prefix=f"lmforge-step-{step}-")) if self.is_main else None
        summary = export(folder)  # every process: a sharded model is gathered
        if self.pusher is not None:
            if summary is not None:
                write_card(folder, run_facts(summary))
            self.pusher.submit(folder, f"step-{step}", f"Checkpoint at step {step} (lmforge)", cleanup=True)

    def on_end(self, final_dir: Path | None, summary: RunSummary | None) -> None:
        """Write the final model's card, push it to main, wait for every push and say what happened."""
        if not self.is_main:
            return
        if final_dir is not None and summary is not None:
            write_card(final_dir, run_facts(summary))
        if self.pusher is None:
            return
        if final_dir is not None:
            self.pusher.submit(final_dir, "main", "Upload final model (lmforge)")
        outcomes = self.pusher.finish()
        print(summary_of_pushes(self.pusher.repo_id, outcomes), flush=True)


def run_publisher(config: Any, *, is_main: bool | None = None) -> RunPublisher:
    """The ``RunPublisher`` of a ``PretrainConfig`` or ``FinetuneConfig`` (its push_to_hub,
    push_checkpoints, hub_private and, for fine-tuning, hub_base_model), checked before anything is
    written: ``pretrain(config, hooks=run_publisher(config))``."""
    RunPublisher.check(config.push_to_hub, config.push_checkpoints)
    base = None
    if config.push_to_hub and hasattr(config, "method"):  # fine-tuning: a pushed adapter names its base
        base = hub_base_model(config.model.path, method=config.method, base_model=config.hub_base_model)
    return RunPublisher(is_main=is_main, push_to_hub=config.push_to_hub, push_checkpoints=config.push_checkpoints,
                        hub_private=config.hub_private, base_model=base)
