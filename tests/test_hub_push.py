"""Publishing: ``lmforge push``, ``--push-to-hub`` / ``--push-checkpoints`` on training, model cards.

Everything goes through the real ``huggingface_hub`` client to the in-memory FakeHub
(tests/fake_hub.py), and every round trip is loaded back in a fresh interpreter where lmforge
cannot be imported. The hub's token is a sentinel: no file, pushed file or output line may hold it.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.config import build_dataclass
from lmforge.publish import hub as hub_module
from lmforge.train import PretrainConfig
from tests.export_utils import run_isolated
from tests.finetune_fixtures import finetune_config, run_finetune, save_base, write_labelled
from tests.train_fixtures import pretrain, save_tokenizers, write_corpus, write_preset

TEXTS = ["the king doth speak", "love"]  # two lengths: the batch is padded


@pytest.fixture(autouse=True)
def no_retry_wait(monkeypatch):
    """lmforge's retries of background pushes, and huggingface_hub's own of LFS uploads, without the sleeps."""
    from huggingface_hub.utils import _http

    monkeypatch.setattr(hub_module, "RETRY_DELAYS", (0.0, 0.0))
    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=lambda seconds: None))


def pretrain_config(root: Path, run: str, **top) -> PretrainConfig:
    tokenizers = save_tokenizers(root / "tok") if not (root / "tok").exists() else {"gpt": root / "tok" / "gpt"}
    corpus = root / "corpus"
    if not corpus.exists():
        write_corpus(corpus)
    values = {
        "objective": "causal", "output_dir": str(root / run),
        "model": {"preset": str(write_preset(root, "gpt"))},
        "data": {"source": str(corpus), "tokenizer": str(tokenizers["gpt"]), "block_size": 32},
        "train": {"micro_batch_size": 4, "max_steps": 10, "log_every": 1, "eval_every": 5, "save_every": 4,
                  "keep_last": 10, "progress": False},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        **top,
    }
    return build_dataclass(PretrainConfig, values)


def local_logits(model, tokenizer) -> list:
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.tolist()


def assert_close(got, expected, what: str) -> None:
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=0, atol=1e-5, msg=what)


def assert_no_secret(token: str, root: Path, hub, output: str) -> None:
    """The token is in no file under ``root``, in no pushed file on any branch, in no output line."""
    needle = token.encode()
    for path in root.rglob("*"):
        if path.is_file():
            assert needle not in path.read_bytes(), f"the token was written into {path}"
    for repo in hub.repos():
        for branch in hub.branches(repo):
            for name, content in hub.files(repo, branch).items():
                assert needle not in content, f"the token was pushed in {repo}@{branch}:{name}"
    assert token not in output, "the token was printed"


def load_isolated(code: str, tmp_path: Path, hub) -> dict:
    """Run ``code`` (with ``logits(model, tok)`` and ``TEXTS`` defined) in a fresh interpreter that
    cannot import lmforge and downloads from ``hub``; return what it emitted."""
    (tmp_path / "isolated").mkdir(exist_ok=True)
    return run_isolated(ISOLATED_PRELUDE % (TEXTS,) + code, path=tmp_path / "isolated", env=hub.env())


ISOLATED_PRELUDE = """
import torch
TEXTS = %r
def logits(model, tok):
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.tolist()
"""


# ----------------------------------------------------------------------------------- training


def test_training_pushes_the_final_model_and_every_checkpoint_as_a_branch(fake_hub, tmp_path, capfd):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    config = pretrain_config(tmp_path, "run", push_to_hub="user/tiny-gpt", push_checkpoints=True)
    result = pretrain(config)
    assert result.train.status == "completed"
    # checkpoints at steps 4 and 8, and the last one at 10; main holds the final model
    assert set(fake_hub.branches("user/tiny-gpt")) == {"main", "step-4", "step-8", "step-10"}
    assert "config.json" in fake_hub.files("user/tiny-gpt", "step-4")

    final = result.run_dir / "final"
    tokenizer = PreTrainedTokenizerFast.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    expected = {"main": local_logits(model, tokenizer)}
    for step in (4, 8):  # the weights each checkpoint held
        state = load_file(result.run_dir / "checkpoints" / f"step_{step}" / "model.safetensors")
        model.load_state_dict(state, strict=False)
        model.tie_weights()
        expected[f"step-{step}"] = local_logits(model, tokenizer)
    assert expected["step-4"] != expected["main"]

    got = load_isolated("""
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("user/tiny-gpt", trust_remote_code=True)
out = {"ids": tok(TEXTS[0])["input_ids"]}
for rev in ("main", "step-4", "step-8"):
    model = AutoModelForCausalLM.from_pretrained("user/tiny-gpt", revision=rev, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    out[rev] = logits(model, tok)
emit(out)
""", tmp_path, fake_hub)
    assert got["ids"] == tokenizer(TEXTS[0])["input_ids"]
    for revision, logits in expected.items():
        assert_close(got[revision], logits, revision)

    from huggingface_hub import ModelCard

    card = ModelCard(fake_hub.files("user/tiny-gpt")["README.md"].decode())
    assert 'from_pretrained("user/tiny-gpt", trust_remote_code=True)' in card.text
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert {"lmforge", "lmforge_gpt"} <= set(card.data.tags)
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics["bits_per_byte"] == pytest.approx(result.train.last_eval["bits_per_byte"], abs=1e-5)
    assert card.data.model_name == "tiny-gpt" and "num_key_value_heads" in card.text
    step_card = fake_hub.files("user/tiny-gpt", "step-4")["README.md"].decode()
    assert 'revision="step-4"' in step_card and "optimizer steps: 4" in step_card

    output = capfd.readouterr()
    assert "hub: pushed to user/tiny-gpt: " in output.out and "NOT pushed" not in output.out
    assert_no_secret(fake_hub.token, tmp_path, fake_hub, output.out + output.err)


def test_a_failing_hub_never_stops_training_and_the_run_says_what_was_not_pushed(fake_hub, tmp_path, capfd):
    fake_hub.fail(500, count=3, path_contains="/commit/step-4")  # every attempt at step-4 fails
    fake_hub.fail(500, count=1, path_contains="/commit/step-8")  # step-8 succeeds on its retry
    result = pretrain(pretrain_config(tmp_path, "run", push_to_hub="user/flaky", push_checkpoints=True))
    assert result.train.status == "completed" and result.train.step == 10
    assert (result.run_dir / "final" / "model.safetensors").is_file()
    branches = fake_hub.branches("user/flaky")
    assert "step-8" in branches and "step-10" in branches
    # step-4's branch may exist (it is created before the commit), but no model was committed to it
    assert "model.safetensors" not in fake_hub.files("user/flaky", "step-4") if "step-4" in branches else True
    out = capfd.readouterr().out
    assert "hub: NOT pushed: step-4" in out and "HTTP 500" in out and "after 3 attempt(s)" in out
    pushed_line = next(line for line in out.splitlines() if line.startswith("hub: pushed to user/flaky"))
    assert "step-8" in pushed_line and "main" in pushed_line and "step-4" not in pushed_line


@pytest.mark.parametrize("top, match", [
    ({"push_checkpoints": True}, "push_checkpoints needs push_to_hub"),
    ({"push_to_hub": "no-slash"}, "push_to_hub: 'no-slash' is not a Hub repo id"),
    ({"push_to_hub": "a/b/c"}, "is not a Hub repo id"),
])
def test_bad_push_settings_are_refused_before_training(fake_hub, tmp_path, top, match):
    config = pretrain_config(tmp_path, "run", **top)
    with pytest.raises(ValueError, match=match):
        pretrain(config)
    assert not (tmp_path / "run").exists() and not fake_hub.repos()


def test_training_with_push_and_no_token_is_refused_before_it_starts(fake_hub, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ValueError, match="no Hugging Face token found"):
        pretrain(pretrain_config(tmp_path, "run", push_to_hub="user/x"))
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------- lmforge push


def _adapter(base: Path, folder: Path):
    """A LoRA adapter on ``base`` whose B matrices are not zero (so it changes the logits)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(folder)
    return peft_model.eval()


def test_push_command_round_trips_a_model_a_tokenizer_an_adapter_and_a_stock_conversion(fake_hub, tmp_path, capfd):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    base = save_base(tmp_path / "base", "gpt")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    tokenizer.save_pretrained(tmp_path / "tok")
    adapter = _adapter(base, tmp_path / "adapter")
    expected = {"base": local_logits(AutoModelForCausalLM.from_pretrained(base).eval(), tokenizer),
                "adapter": local_logits(adapter, tokenizer), "ids": tokenizer(TEXTS[0])["input_ids"]}

    assert main(["push", str(base), "user/base", "--commit-message", "first model"]) == 0
    out = capfd.readouterr().out
    commit = fake_hub.commits("user/base")[0]
    assert commit["message"] == "first model" and commit["id"] in out and f"{fake_hub.url}/user/base" in out
    assert main(["push", str(tmp_path / "tok"), "user/tok"]) == 0
    assert main(["push", str(tmp_path / "tok"), "user/base", "--revision", "tokenizer-only"]) == 0
    assert set(fake_hub.branches("user/base")) == {"main", "tokenizer-only"}
    assert "model.safetensors" in fake_hub.files("user/base")  # main is untouched by the branch's commit
    assert 'revision="tokenizer-only"' in fake_hub.files("user/base", "tokenizer-only")["README.md"].decode()
    # the adapter's base is a folder on this disk: refused until it is named by its repo id
    assert main(["push", str(tmp_path / "adapter"), "user/adapter"]) == 2
    assert "--hub-base-model USER/BASE" in capfd.readouterr().err and not fake_hub.repo_exists("user/adapter")
    assert main(["push", str(tmp_path / "adapter"), "user/adapter", "--hub-base-model", "user/base"]) == 0
    assert main(["push", str(base), "user/base-hf", "--to-hf", "--hub-private"]) == 0

    pushed = fake_hub.files("user/base")
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= set(pushed)
    assert any(name.startswith("modeling_") for name in pushed), "the model code is pushed"
    assert json.loads(fake_hub.files("user/adapter")["adapter_config.json"])["base_model_name_or_path"] == "user/base"
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    hf_files = fake_hub.files("user/base-hf")
    assert "auto_map" not in json.loads(hf_files["config.json"]) and fake_hub.is_private("user/base-hf")
    assert not any(name.endswith(".py") for name in hf_files)

    got = load_isolated("""
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("user/tok")
base = AutoModelForCausalLM.from_pretrained("user/base", trust_remote_code=True).eval()
out = {"ids": tok(TEXTS[0])["input_ids"], "base": logits(base, tok)}
out["adapter"] = logits(PeftModel.from_pretrained(base, "user/adapter").eval(), tok)
stock = AutoModelForCausalLM.from_pretrained("user/base-hf", trust_remote_code=False).eval()
stock_tok = AutoTokenizer.from_pretrained("user/base-hf")
out["stock_class"] = type(stock).__name__
out["stock"] = logits(stock, stock_tok)
emit(out)
""", tmp_path, fake_hub)
    assert got["ids"] == expected["ids"]
    assert_close(got["base"], expected["base"], "pushed model")
    assert_close(got["adapter"], expected["adapter"], "pushed adapter")
    assert got["stock_class"] == "LlamaForCausalLM"
    assert_close(got["stock"], expected["base"], "pushed --to-hf model")
    assert_no_secret(fake_hub.token, tmp_path, fake_hub, "".join(capfd.readouterr()))


def test_a_finetuned_lora_adapter_is_pushed_naming_its_base_and_loads_with_peft(fake_hub, tmp_path):
    from transformers import PreTrainedTokenizerFast

    base = save_base(tmp_path / "base", "gpt")
    assert main(["push", str(base), "user/base"]) == 0
    data = write_labelled(tmp_path / "data")
    config = finetune_config(tmp_path / "ft", base, data, method="lora", train={"max_steps": 4, "save_every": 2})
    result = run_finetune({**config, "push_to_hub": "user/sentiment-lora", "hub_base_model": "user/base",
                           "push_checkpoints": True})
    assert set(fake_hub.branches("user/sentiment-lora")) == {"main", "step-2", "step-4"}
    from huggingface_hub import ModelCard

    card = ModelCard(fake_hub.files("user/sentiment-lora")["README.md"].decode())
    assert card.data.base_model == "user/base" and card.data.library_name == "peft"
    assert str(base) not in card.text.split("## Configuration")[0]
    assert {r.metric_type for r in card.data.eval_results} >= {"accuracy"}

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    final = result.final_dir
    id2label = {int(k): v for k, v in json.loads((final / "config.json").read_text())["id2label"].items()}
    tokenizer = PreTrainedTokenizerFast.from_pretrained(final)
    local = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(id2label), id2label=id2label), final).eval()
    expected = local_logits(local, tokenizer)
    load = card.text.split("```python\n")[1].split("```")[0]  # the card's own loading code
    got = load_isolated(load + """
emit({"logits": logits(model.eval(), tokenizer), "labels": model.config.id2label})
""", tmp_path, fake_hub)
    assert_close(got["logits"], expected, "pushed fine-tuned adapter")
    assert {int(k): v for k, v in got["labels"].items()} == id2label


def test_a_lora_finetune_on_a_local_base_without_its_hub_id_is_refused_before_training(fake_hub, tmp_path):
    base = save_base(tmp_path / "base", "gpt")
    data = write_labelled(tmp_path / "data")
    config = finetune_config(tmp_path / "ft", base, data, method="lora")
    with pytest.raises(ValueError, match="set hub_base_model: USER/BASE"):
        run_finetune({**config, "push_to_hub": "user/x"})
    assert not (tmp_path / "ft").exists() and not fake_hub.repos()


# ----------------------------------------------------------------------------------- bad input


@pytest.fixture
def small_model(tmp_path):
    return save_base(tmp_path / "model", "gpt")


@pytest.mark.parametrize("repo_id", ["no-slash", "a/b/c", "user/has space", "user/-bad", "user/"])
def test_a_malformed_repo_id_is_refused(fake_hub, small_model, capfd, repo_id):
    assert main(["push", str(small_model), repo_id]) == 2
    assert "is not a Hub repo id" in capfd.readouterr().err and not fake_hub.repos()


def test_a_folder_that_is_no_model_adapter_or_tokenizer_is_refused(fake_hub, tmp_path, capfd):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("hello")
    assert main(["push", str(tmp_path / "notes"), "user/x"]) == 2
    err = capfd.readouterr().err
    assert "no model in this folder" in err and "adapter" in err and "tokenizer" in err and not fake_hub.repos()


def test_a_model_without_a_tokenizer_is_pushed_with_a_warning(fake_hub, small_model, capfd):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (small_model / name).unlink(missing_ok=True)
    assert main(["push", str(small_model), "user/no-tok"]) == 0
    assert "holds no tokenizer" in capfd.readouterr().out
    files = fake_hub.files("user/no-tok")
    assert "model.safetensors" in files and "tokenizer.json" not in files
    assert "holds no tokenizer" in files["README.md"].decode()


def _nothing_committed(hub, repo_id: str) -> bool:
    return not hub.repo_exists(repo_id) or "model.safetensors" not in hub.files(repo_id)


@pytest.mark.parametrize("fault, message", [
    ("bad-token", "refused the token (HTTP 401"),
    ("no-token", "no Hugging Face token found"),
    ("500-on-commit", "HTTP 500"),
    ("drop-on-upload", "connection"),
    ("drop-on-commit", "connection"),
    ("card-rejected", "the Hub rejects the model card's metadata"),
])
def test_server_failures_give_a_clear_message_and_nothing_is_reported_as_pushed(
        fake_hub, small_model, capfd, monkeypatch, fault, message):
    if fault == "bad-token":
        monkeypatch.setenv("HF_TOKEN", "hf_not_the_right_one")
    elif fault == "no-token":
        monkeypatch.delenv("HF_TOKEN")
    elif fault == "500-on-commit":
        fake_hub.fail(500, count=10, path_contains="/commit/")
    elif fault == "drop-on-upload":
        fake_hub.drop(count=10, method="PUT")  # the LFS upload of the weights
    elif fault == "drop-on-commit":
        fake_hub.drop(count=10, path_contains="/commit/")
    else:
        fake_hub.fail(400, path_contains="/api/validate-yaml")
    assert main(["push", str(small_model), "user/broken"]) == 2
    captured = capfd.readouterr()
    assert message in captured.err and ("nothing from this push was published" in captured.err
                                        or "nothing was pushed" in captured.err), captured.err
    assert "pushed model" not in captured.out and "commit" not in captured.out
    assert _nothing_committed(fake_hub, "user/broken")
    assert_no_secret(fake_hub.token, small_model.parent, fake_hub, captured.out + captured.err)


def test_pushing_again_replaces_the_weights_and_keeps_other_files(fake_hub, small_model, tmp_path):
    """A repo that already holds other weights (an earlier sharded push) ends with only the new
    ones, so from_pretrained cannot mix shards; files that are not weights stay."""
    from huggingface_hub import HfApi

    assert main(["push", str(small_model), "user/again"]) == 0
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "model-00002-of-00002.safetensors").write_bytes(b"stale shard")
    (extra / "model.safetensors.index.json").write_text("{}")
    (extra / "NOTES.md").write_text("kept")
    HfApi().upload_folder(repo_id="user/again", folder_path=extra)
    assert main(["push", str(small_model), "user/again"]) == 0
    files = fake_hub.files("user/again")
    assert "model-00002-of-00002.safetensors" not in files and "model.safetensors.index.json" not in files
    assert files["model.safetensors"] == (small_model / "model.safetensors").read_bytes()
    assert files["NOTES.md"] == b"kept"


def test_an_adapter_on_the_built_in_minilm_names_its_hub_id(fake_hub, tmp_path):
    """The built-in all-minilm-l6-v2 is the PyPI copy of a Hub model: a pushed adapter trained on it
    names the Hub id, so it loads wherever the Hub does, without --hub-base-model."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from lmforge.runs import builtin_model_dir

    base = builtin_model_dir("all-minilm-l6-v2")
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    adapter = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=2, target_modules=["query", "value"]))
    adapter.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    assert main(["push", str(tmp_path / "adapter"), "user/minilm-lora"]) == 0
    pushed = json.loads(fake_hub.files("user/minilm-lora")["adapter_config.json"])
    assert pushed["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
