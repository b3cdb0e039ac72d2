"""Chat SFT data (lmforge.data.chat): assistant-only labels for any chat template, truncation,
packing without attention or state across conversations, bad input, chat_generate, and the
Shakespeare chat set built from the real corpus."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from lmforge.data.chat import (
    IGNORE_INDEX,
    build_sft_dataset,
    build_shakespeare_chat,
    chat_generate,
    encode_conversation,
    end_of_turn_ids,
    pack_conversations,
)
from lmforge.data.collators import CausalLMCollator
from lmforge.errors import LmforgeError
from lmforge.tokenizers.train import train_tokenizer
from tests.pipeline_fixtures import gpt_tokenizer, make_corpus
from tests.torch_threads import single_thread  # noqa: F401
from tests.train_fixtures import PRESETS

pytestmark = pytest.mark.usefixtures("single_thread")

# Llama-3 shape: bos first, header tokens around the role, content trimmed, no newline after the
# end-of-turn token.
LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# ChatML shape (Qwen-like): the role is plain text after <|im_start|>, and a default system
# prompt is injected when the conversation has none.
CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = make_corpus(200) + ["Ünïcödé — 日本語 🤗 <b>&amp;</b> {{ x }} tabs\tand\nnewlines"]


def _tokenizer(kind: str):
    if kind == "chat":
        return train_tokenizer(CORPUS, "bpe", vocab_size=400, special_tokens="chat", show_progress=False)
    tokens, template = {
        "llama3": (["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], LLAMA3_TEMPLATE),
        "chatml": (["<|im_start|>", "<|im_end|>"], CHATML_TEMPLATE),
    }[kind]
    return train_tokenizer(CORPUS, "bpe", vocab_size=400, special_tokens="gpt", extra_special_tokens=tokens,
                           chat_template=template, show_progress=False)


# what the labelled tokens of one assistant turn must decode to, per template
TURN_TEXT = {
    "chat": lambda content: content + "<|end|>",
    "llama3": lambda content: content.strip() + "<|eot_id|>",
    "chatml": lambda content: content + "<|im_end|>",
}

CONVERSATIONS = [
    [{"role": "user", "content": "the king speaks"},
     {"role": "assistant", "content": "thou art fair"}],
    [{"role": "system", "content": "Answer as a lord."},
     {"role": "user", "content": "wherefore love?"},
     {"role": "assistant", "content": "sweet death\nand night"},
     {"role": "user", "content": "Ünïcödé — 日本語 🤗"},
     {"role": "assistant", "content": "<b>&amp;</b> {{ 1 + 1 }} {% raw %} 🤗 queen"},
     {"role": "user", "content": "and?"},
     {"role": "assistant", "content": "  tabs\tand\n\nnewlines  "}],
    [{"role": "user", "content": "two answers in a row"},
     {"role": "assistant", "content": "first"},
     {"role": "assistant", "content": "second"},
     {"role": "user", "content": "a last question nobody answers"}],
    [{"role": "user", "content": "empty answer"},
     {"role": "assistant", "content": ""}],
]


@pytest.fixture(scope="module", params=["chat", "llama3", "chatml"])
def templated(request):
    return request.param, _tokenizer(request.param)


@pytest.fixture(scope="module")
def chat_tok():
    return _tokenizer("chat")


def _runs(labels: list[int]) -> list[range]:
    """Maximal runs of labelled positions."""
    runs, start = [], None
    for t, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = t
        elif label == IGNORE_INDEX and start is not None:
            runs.append(range(start, t))
            start = None
    return runs


# --------------------------------------------------------------------------- label masking


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_only_assistant_turns_and_their_end_marker_are_labelled(templated, conversation):
    """Each run of labelled tokens decodes to exactly one assistant turn's content plus its
    end-of-turn marker, in order: so every assistant token is labelled and no prompt token
    (system/user turns, role headers, generation prompt, injected system prompt) is."""
    kind, tok = templated
    messages = CONVERSATIONS[conversation]
    row = encode_conversation(tok, messages, max_length=None, where="test")
    ids, labels = row["input_ids"], row["labels"]
    expected_ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ids == expected_ids  # the same tokens generation sees
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels, strict=True))
    decoded = [tok.decode([ids[t] for t in run]) for run in _runs(labels)]
    assert decoded == [TURN_TEXT[kind](m["content"]) for m in messages if m["role"] == "assistant"]
    # the prompt side: everything else, with each assistant turn cut out, is the prompt text
    prompt = tok.decode([i for i, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX])
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"].strip() in prompt


def test_labels_survive_truncation(templated):
    kind, tok = templated
    messages = CONVERSATIONS[1]
    full = encode_conversation(tok, messages, max_length=None, where="test")
    n = len(full["input_ids"])
    for k in [1, 2, 3, *range(5, n + 3, 3)]:
        cut = encode_conversation(tok, messages, max_length=k, where="test")
        assert cut["input_ids"] == full["input_ids"][:k]
        assert cut["labels"] == full["labels"][:k]


def test_prompt_tokens_are_ignored_position_by_position(chat_tok):
    """A hand-checked layout for the chat preset: role markers, newlines and user text -100."""
    messages = CONVERSATIONS[0]
    row = encode_conversation(chat_tok, messages, max_length=None, where="test")
    tokens = chat_tok.convert_ids_to_tokens(row["input_ids"])
    labelled = [tok for tok, label in zip(tokens, row["labels"], strict=True) if label != IGNORE_INDEX]
    ignored = [tok for tok, label in zip(tokens, row["labels"], strict=True) if label == IGNORE_INDEX]
    assert labelled[-1] == "<|end|>" and labelled.count("<|end|>") == 1
    assert "<|user|>" in ignored and "<|assistant|>" in ignored and ignored[-1] == "Ċ"  # "\n" after <|end|>
    a = tokens.index("<|assistant|>")
    assert row["labels"][:a + 2] == [IGNORE_INDEX] * (a + 2)  # up to the header's newline
    assert row["labels"][a + 2] == row["input_ids"][a + 2]  # the first answer token


def test_conversation_opening_with_the_assistant(chat_tok):
    messages = [{"role": "assistant", "content": "hail"}, {"role": "user", "content": "hail"}]
    row = encode_conversation(chat_tok, messages, max_length=None, where="test")
    assert [chat_tok.decode([row["input_ids"][t] for t in r]) for r in _runs(row["labels"])] == ["hail<|end|>"]


def test_end_of_turn_ids(templated):
    kind, tok = templated
    marker = {"chat": "<|end|>", "llama3": "<|eot_id|>", "chatml": "<|im_end|>"}[kind]
    assert end_of_turn_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids(marker)]


# --------------------------------------------------------------------------- bad input


def test_template_that_rewrites_earlier_turns_is_refused():
    tok = _tokenizer("chat")
    tok.chat_template = (  # earlier assistant turns are rendered differently from the last one
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ '<|assistant|>\n(earlier)<|end|>\n' }}{% else %}"
        "{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    with pytest.raises(LmforgeError, match="row 7: the chat template does not render prefixes as prefixes"):
        encode_conversation(tok, CONVERSATIONS[1], max_length=None, where="chats.jsonl row 7")


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "hi"}], r"row 3: no assistant message \(roles: user\)"),
    ([{"role": "user", "content": "hi"}, {"role": "narrator", "content": "x"},
      {"role": "assistant", "content": "y"}],
     r"row 3: the chat template rejects message 1 with role 'narrator': chat roles are system, user and "
     r"assistant"),
    ([{"content": "hi"}, {"role": "assistant", "content": "y"}], r"row 3: message 0 has no 'role'"),
    ([{"role": "user"}, {"role": "assistant", "content": "y"}], r"row 3: message 0 has no 'content'"),
    ([{"role": "user", "content": None}, {"role": "assistant", "content": "y"}],
     r"row 3: message 0 has no 'content'"),
    ([{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}],
     r"row 3: message 0 \(user\) has content of type int"),
    ([{"role": "", "content": "hi"}, {"role": "assistant", "content": "y"}], r"row 3: message 0 has role ''"),
    ("hello", r"row 3: expected a non-empty list"),
    ([], r"row 3: expected a non-empty list"),
    (["hello"], r"row 3: message 0 is 'hello'"),
])
def test_bad_conversations(chat_tok, messages, match):
    with pytest.raises(LmforgeError, match=match):
        encode_conversation(chat_tok, messages, max_length=None, where="chats.jsonl row 3")


def test_tokenizer_without_chat_template():
    plain = gpt_tokenizer()
    with pytest.raises(LmforgeError, match=r"no chat template.*--config chat-bpe"):
        encode_conversation(plain, CONVERSATIONS[0], max_length=None, where="x")
    with pytest.raises(LmforgeError, match=r"no chat template.*--config chat-bpe"):
        build_sft_dataset("does-not-matter.jsonl", "train", plain, max_length=32)


def _write(folder: Path, split: str, rows: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                           encoding="utf-8")
    return folder


def test_dataset_errors_name_source_split_row_and_columns(tmp_path, chat_tok):
    good = {"messages": CONVERSATIONS[0]}
    folder = _write(tmp_path / "roles", "validation",
                    [good, good, {"messages": [{"role": "user", "content": "a"}, {"role": "critic", "content": "b"},
                                              {"role": "assistant", "content": "c"}]}])
    with pytest.raises(LmforgeError, match=re.escape(f"{folder} (split 'validation') row 2: the chat template "
                                                     "rejects message 1 with role 'critic'")):
        build_sft_dataset(str(folder), "validation", chat_tok, max_length=64)

    folder = _write(tmp_path / "no-assistant", "train", [good, {"messages": [{"role": "user", "content": "a"}]}])
    with pytest.raises(LmforgeError, match=re.escape(f"{folder} (split 'train') row 1: no assistant message")):
        build_sft_dataset(str(folder), "train", chat_tok, max_length=64)

    folder = _write(tmp_path / "no-role", "train", [good, {"messages": [{"content": "a"}, {"role": "assistant",
                                                                                            "content": "b"}]}])
    with pytest.raises(LmforgeError, match=re.escape(f"{folder} (split 'train') row 1: message 0 has no 'role'")):
        build_sft_dataset(str(folder), "train", chat_tok, max_length=64)

    folder = _write(tmp_path / "column", "train", [{"conversation": CONVERSATIONS[0], "id": 1}])
    with pytest.raises(LmforgeError, match=r"no column 'messages'; columns are conversation, id"):
        build_sft_dataset(str(folder), "train", chat_tok, max_length=64)
    ds = build_sft_dataset(str(folder), "train", chat_tok, messages_column="conversation", max_length=64)
    assert ds.column_names == ["input_ids", "labels"]

    with pytest.raises(LmforgeError, match="max_length"):
        build_sft_dataset(str(folder), "train", chat_tok, messages_column="conversation", max_length=1)


# --------------------------------------------------------------------------- datasets and packing


def _chats(n: int, seed: int = 0) -> list[dict]:
    texts = make_corpus(3 * n, seed=seed, max_words=8)
    rows = []
    for i in range(n):
        messages = [{"role": "user", "content": texts[3 * i]}, {"role": "assistant", "content": texts[3 * i + 1]}]
        if i % 3 == 1:
            messages += [{"role": "user", "content": "and?"}, {"role": "assistant", "content": texts[3 * i + 2]}]
        rows.append({"messages": messages, "id": i})
    return rows


def test_unpacked_rows_and_dropped_conversations(tmp_path, chat_tok):
    rows = _chats(12)
    long_prompt = {"messages": [{"role": "user", "content": "the king " * 40}, {"role": "assistant", "content": "ay"}]}
    folder = _write(tmp_path / "chats", "train", rows[:5] + [long_prompt] + rows[5:])
    with pytest.warns(UserWarning, match=r"dropped 1 of 13 conversations whose assistant turns start after "
                                         r"max_length 48"):
        ds = build_sft_dataset(str(folder), "train", chat_tok, max_length=48)
    expected = [encode_conversation(chat_tok, r["messages"], max_length=48, where="") for r in rows]
    assert ds["input_ids"] == [e["input_ids"] for e in expected]
    assert ds["labels"] == [e["labels"] for e in expected]
    assert ds.column_names == ["input_ids", "labels"]
    from datasets import Dataset  # a dataset object is a source too

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = build_sft_dataset(Dataset.from_list(rows + [long_prompt]), "train", chat_tok, max_length=48)
    assert again["input_ids"] == ds["input_ids"] and again["labels"] == ds["labels"]

    only_long = _write(tmp_path / "long", "train", [long_prompt])
    with warnings.catch_warnings(), pytest.raises(LmforgeError, match="no conversation keeps an assistant token"):
        warnings.simplefilter("ignore")
        build_sft_dataset(str(only_long), "train", chat_tok, max_length=48)


def test_packing_is_greedy_and_keeps_every_token(tmp_path, chat_tok):
    folder = _write(tmp_path / "chats", "train", _chats(40))
    plain = build_sft_dataset(str(folder), "train", chat_tok, max_length=64)
    packed = build_sft_dataset(str(folder), "train", chat_tok, max_length=64, pack=True, batch_size=16)
    assert packed.column_names == ["input_ids", "labels", "position_ids", "seq_idx"]
    assert len(packed) < len(plain)
    lengths = [len(r) for r in plain["input_ids"]]
    convs = iter(range(len(plain)))
    for row in packed:
        assert len(row["input_ids"]) <= 64
        n_docs = row["seq_idx"][-1] + 1
        for d in range(n_docs):
            k = next(convs)
            at = [t for t, s in enumerate(row["seq_idx"]) if s == d]
            assert at == list(range(at[0], at[0] + lengths[k]))  # whole and contiguous
            assert [row["input_ids"][t] for t in at] == plain[k]["input_ids"]
            assert [row["labels"][t] for t in at] == plain[k]["labels"]
            assert [row["position_ids"][t] for t in at] == list(range(lengths[k]))
    assert next(convs, None) is None  # every conversation once, in order
    # greedy: a row closes only when the next conversation of the same map batch does not fit
    k = 0
    for row in packed:
        k += row["seq_idx"][-1] + 1
        if k % 16 and k < len(plain):
            assert len(row["input_ids"]) + lengths[k] > 64


def test_pack_conversations_small_example():
    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]},
            {"input_ids": [6, 7, 8, 9], "labels": [-100, -100, 8, 9]}]
    out = pack_conversations(rows, 5)
    assert out["input_ids"] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert out["labels"] == [[-100, 2, 3, -100, 5], [-100, -100, 8, 9]]
    assert out["position_ids"] == [[0, 1, 2, 0, 1], [0, 1, 2, 3]]
    assert out["seq_idx"] == [[0, 0, 0, 1, 1], [0, 0, 0, 0]]
    with pytest.raises(LmforgeError, match="does not fit max_length 3"):
        pack_conversations(rows, 3)


def _tiny_model(family: str, vocab: int, **changes):
    from transformers import AutoConfig, AutoModelForCausalLM

    import lmforge.models  # noqa: F401  (registers the lmforge model types)

    fields = {**PRESETS[family], **changes}
    config = AutoConfig.for_model(fields.pop("model_type"), vocab_size=vocab, **fields)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", ["gpt", "mamba"])
def test_packed_logits_equal_each_conversation_alone(tmp_path, chat_tok, family):
    folder = _write(tmp_path / "chats", "train", _chats(8))
    plain = build_sft_dataset(str(folder), "train", chat_tok, max_length=128)
    packed = build_sft_dataset(str(folder), "train", chat_tok, max_length=128, pack=True)
    k0 = 0  # the index of the row's first conversation
    for row in packed:
        if row["seq_idx"][-1] >= 2:  # a row with three conversations or more
            break
        k0 += row["seq_idx"][-1] + 1
    model = _tiny_model(family, len(chat_tok), **({"max_position_embeddings": 128} if family == "gpt" else {}))
    collate = CausalLMCollator(chat_tok.pad_token_id)
    batch = collate([row])
    assert "attention_mask" not in batch
    inputs = {"input_ids": batch["input_ids"]}
    inputs.update({"position_ids": batch["position_ids"]} if family == "gpt" else {"seq_idx": batch["seq_idx"]})
    with torch.no_grad():
        together = model(**inputs, use_cache=False).logits[0]
        start = 0
        for d in range(row["seq_idx"][-1] + 1):
            alone_row = plain[k0 + d]
            alone = model(**collate([alone_row]), use_cache=False).logits[0]
            n = len(alone_row["input_ids"])
            torch.testing.assert_close(together[start:start + n], alone, rtol=1e-5, atol=1e-5)
            start += n
        mixed = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    n0 = len(plain[k0]["input_ids"])
    assert not torch.allclose(mixed[n0:start], together[n0:start], atol=1e-3)  # the masks matter
    # the collated labels are the row's labels, minus each conversation's first token
    expected = torch.tensor(row["labels"])
    expected[torch.tensor(row["position_ids"]) == 0] = IGNORE_INDEX
    assert torch.equal(batch["labels"][0], expected)


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("family", ["gpt", "mamba"])
def test_chat_generate_answers_in_the_assistant_role(chat_tok, family):
    """A tiny model trained on one conversation (loss on the answer only) answers the prompt with
    the answer and stops at the end-of-turn marker."""
    messages = [{"role": "user", "content": "the king"}, {"role": "assistant", "content": "thou art fair"}]
    row = encode_conversation(chat_tok, messages, max_length=None, where="test")
    batch = CausalLMCollator(chat_tok.pad_token_id)([row])
    model = _tiny_model(family, len(chat_tok)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.05
    answer = chat_generate(model, chat_tok, messages[:1], max_new_tokens=20)
    assert answer == "thou art fair"
    assert model.training  # restored


# --------------------------------------------------------------------------- Shakespeare chat


@pytest.fixture(scope="module")
def shakespeare_chat(tmp_path_factory):
    folder = build_shakespeare_chat(tmp_path_factory.mktemp("shakespeare-chat"))
    return {split: [json.loads(line) for line in (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
            for split in ("train", "validation", "test")}


def test_shakespeare_chat_rows(shakespeare_chat, chat_tok):
    from lmforge.data.sources import load_corpus

    assert 2000 <= len(shakespeare_chat["train"]) <= 10000
    assert min(len(shakespeare_chat["validation"]), len(shakespeare_chat["test"])) >= 100
    plays = {}
    for split, rows in shakespeare_chat.items():
        plays[split] = {r["play"] for r in rows}
        assert plays[split] <= set(load_corpus("shakespeare", split=split)["id"])
        for r in rows:
            user, assistant = r["messages"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
            m = re.fullmatch(r"Continue this speech by ([A-Z0-9][A-Z0-9 '&\-]*): (\S.*)", user["content"])
            assert m and m.group(1) == r["character"], user["content"]
            assert 3 <= len(assistant["content"].split("\n")) <= 9
            assert "[" not in user["content"] + assistant["content"]
            assert assistant["content"] == assistant["content"].strip()
    assert not plays["train"] & plays["validation"] and not plays["train"] & plays["test"]
    assert not plays["validation"] & plays["test"]
    hamlet = [r for r in shakespeare_chat["train"] if r["play"] == "hamlet"]
    assert {"HAMLET", "HORATIO", "POLONIUS"} <= {r["character"] for r in hamlet}  # "Ham." -> HAMLET
    assert any(r["messages"][0]["content"] == "Continue this speech by HAMLET: Ay, sir; that soaks up the "
               "King's countenance, his rewards," and r["messages"][1]["content"].startswith("his authorities.")
               for r in hamlet)
    for r in shakespeare_chat["validation"][:50]:
        row = encode_conversation(chat_tok, r["messages"], max_length=None, where="shakespeare chat")
        assert [chat_tok.decode([row["input_ids"][t] for t in run]) for run in _runs(row["labels"])] == \
            [r["messages"][1]["content"] + "<|end|>"]


def test_shakespeare_chat_builds_an_sft_dataset(shakespeare_chat, tmp_path, chat_tok):
    folder = _write(tmp_path / "chat", "validation", shakespeare_chat["validation"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny tokenizer makes long rows: some are dropped
        ds = build_sft_dataset(str(folder), "validation", chat_tok, max_length=256, pack=True)
    assert len(ds) > 0 and all(len(r) <= 256 for r in ds["input_ids"])
