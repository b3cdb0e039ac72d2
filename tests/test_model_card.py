"""Model cards: Hub metadata through ModelCardData (model-index results), the Load section and its
rewriting for a repo id, nothing secret or local where the Hub would show it."""

from __future__ import annotations

import json
from types import SimpleNamespace

from huggingface_hub import ModelCard

from lmforge.publish.cards import (
    LOCAL_ID,
    build_card,
    duration,
    folder_facts,
    retarget,
    run_facts,
    write_card,
)
from lmforge.train.hooks import RunSummary


def _config(**extra):
    values = {"model_type": "lmforge_gpt", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "position_embedding_type": "rope", "norm_type": "rmsnorm", **extra}
    return SimpleNamespace(model_type=values["model_type"], to_dict=lambda: values)


def _model_folder(tmp_path, *, remote=True, tokenizer=True, name="final"):
    folder = tmp_path / "run" / name
    folder.mkdir(parents=True)
    config = {"architectures": ["LmforgeGPTForCausalLM"], "model_type": "lmforge_gpt"}
    if remote:
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_gpt.LmforgeGPTForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    if tokenizer:
        (folder / "tokenizer.json").write_text("{}")
    return folder


def test_a_pretraining_card_has_hub_metadata_and_results_in_model_index(tmp_path):
    folder = _model_folder(tmp_path)
    corpus = tmp_path / "my corpus"
    corpus.mkdir()
    facts = run_facts(RunSummary(
        kind="pretrain", model_config=_config(), objective="causal",
        config={"data": {"source": str(corpus)}, "hub_token": "hf_x"}, data=str(corpus), steps=120,
        tokens_seen=65_536, elapsed_seconds=3725.4, status="completed", n_params=1_234_567, license="mit",
        metrics={"validation": {"loss": 1.5, "perplexity": 4.48, "bits_per_byte": 2.01, "tokens": 9000,
                                "bytes": 30000}}))
    card = ModelCard(write_card(folder, facts).read_text())
    data = card.data
    assert data.license == "mit" and data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.tags == ["lmforge", "lmforge_gpt", "causal-lm"]
    assert data.datasets is None  # a local folder is no Hub dataset
    results = {r.metric_type: r for r in data.eval_results}
    assert set(results) == {"loss", "perplexity", "bits_per_byte"}  # counts are not results
    assert results["bits_per_byte"].metric_value == 2.01 and results["bits_per_byte"].dataset_split == "validation"
    assert results["loss"].dataset_name == "my corpus"  # the folder's name, not its path on this disk
    assert str(tmp_path) not in card.content.split("## Training")[0]
    assert data.model_name == "run"  # final/ is named after its run
    text = card.text
    assert "1,234,567 (1.23M)" in text and "| num_key_value_heads | `2` |" in text and "tokens seen: 65,536" in text
    assert "training time: 1 h 2 min 5 s" in text and "optimizer steps: 120 (completed)" in text
    assert "hub_token" not in text and "hf_x" not in text
    assert f'AutoModelForCausalLM.from_pretrained("{LOCAL_ID}", trust_remote_code=True)' in text


def test_hub_datasets_are_named_and_undefined_metrics_left_out(tmp_path):
    folder = _model_folder(tmp_path, name="cls")
    facts = run_facts(RunSummary(
        kind="finetune", model_config=_config(), base_model="user/base", task="classification", method="full",
        config={}, data="stanfordnlp/imdb", steps=10, tokens_seen=640, elapsed_seconds=5, status="completed",
        trainable=10, n_params=10, labels=["neg", "pos"],
        metrics={"validation": {"accuracy": 0.9, "pearson": float("nan")}, "test": {"accuracy": 0.8}}))
    card = build_card(folder, facts)
    assert card.data.datasets == ["stanfordnlp/imdb"] and card.data.base_model == "user/base"
    rows = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert rows == {("validation", "accuracy"): 0.9, ("test", "accuracy"): 0.8}
    assert "labels: neg, pos" in card.text


def test_retarget_rewrites_the_load_section_for_a_repo_and_branch(tmp_path):
    folder = _model_folder(tmp_path, remote=False)
    card = str(build_card(folder, folder_facts(folder)))
    assert f'from_pretrained("{LOCAL_ID}")' in card and "trust_remote_code" not in card  # stock: no remote code
    pushed = retarget(card, folder, "user/model@step-100")
    assert 'from_pretrained("user/model", revision="step-100")' in pushed and LOCAL_ID not in pushed
    assert pushed.count("## Load") == 1 and pushed.split("## Load")[0] == card.split("## Load")[0]
    assert pushed.split("## Evaluation")[1] == card.split("## Evaluation")[1]
    # a card written by hand without a Load section gets one after its title paragraph
    added = retarget("---\nlicense: mit\n---\n# My model\n\nIt is good.\n\n## Notes\n\nnone\n", folder, "user/m")
    assert added.index("# My model") < added.index("## Load") < added.index("## Notes")


def test_cards_for_an_adapter_and_a_tokenizer_say_how_to_load_them(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "user/base",
                                                               "task_type": "SEQ_CLS"}))
    (adapter / "config.json").write_text(json.dumps({"id2label": {"0": "neg", "1": "pos"}}))
    text = retarget("# a\n", adapter, "user/adapter")
    assert ('AutoModelForSequenceClassification.from_pretrained("user/base", num_labels=2, '
            "id2label={0: 'neg', 1: 'pos'}, trust_remote_code=True)") in text
    assert 'PeftModel.from_pretrained(base, "user/adapter")' in text
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 1}}}))
    card = build_card(tokenizer, folder_facts(tokenizer))
    assert "with 2 tokens" in card.text and f'AutoTokenizer.from_pretrained("{LOCAL_ID}")' in card.text


def test_duration():
    assert [duration(s) for s in (0.4, 59.6, 61, 3600)] == ["0 s", "1 min 0 s", "1 min 1 s", "1 h 0 min 0 s"]
