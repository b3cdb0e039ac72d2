"""Preference pairs: plain-text and conversational rows tokenized as the module docstring says,
both truncation rules with their counts, the collator's layout, and bad rows refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset
from tokenizers.processors import TemplateProcessing

from lmforge.data.collators import IGNORE_INDEX
from lmforge.data.preference import PairEncoder, PreferenceCollator, load_preference_pairs
from lmforge.errors import LmforgeError
from tests.finetune_fixtures import chat_tokenizer
from tests.pipeline_fixtures import gpt_tokenizer, make_corpus


@pytest.fixture(scope="module")
def tok():
    return gpt_tokenizer(make_corpus(200))  # byte-level BPE, eos <|endoftext|>, no bos


@pytest.fixture(scope="module")
def chat():
    return chat_tokenizer()


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _write(folder: Path, rows: list[dict], split: str = "train") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_text_pairs_are_prompt_then_completion_with_eos(tmp_path, tok):
    rows = [{"prompt": "sweet love", "chosen": " fair and sweet", "rejected": " foul"},
            {"prompt": "the king", "chosen": " is fair", "rejected": " is foul and late"}]
    data = load_preference_pairs(str(_write(tmp_path, rows)), "train", tok, max_length=64)
    assert data.rows == 2 and data.truncated == 0 and data.dropped == 0 and not data.conversational
    for row, pair in zip(rows, data.pairs, strict=True):
        assert pair["prompt_ids"] == _ids(tok, row["prompt"])
        assert pair["chosen_ids"] == _ids(tok, row["chosen"]) + [tok.eos_token_id]
        assert pair["rejected_ids"] == _ids(tok, row["rejected"]) + [tok.eos_token_id]


def test_a_bos_the_tokenizer_adds_starts_the_prompt_and_an_appended_eos_does_not_end_it(tok):
    """Only special tokens the tokenizer puts before a text are kept, on the prompt."""
    for template, bos in (("<|endoftext|> $A", True), ("$A <|endoftext|>", False)):
        t = tok.__class__(tokenizer_object=tok.backend_tokenizer.__class__.from_str(tok.backend_tokenizer.to_str()),
                          eos_token=tok.eos_token, pad_token=tok.pad_token)
        t.backend_tokenizer.post_processor = TemplateProcessing(
            single=template, special_tokens=[("<|endoftext|>", tok.eos_token_id)])
        pair, _ = PairEncoder(t, max_length=64).encode("sweet love", " fair", " foul", "row")
        assert pair["prompt_ids"] == ([tok.eos_token_id] if bos else []) + _ids(tok, "sweet love")
        assert pair["chosen_ids"] == _ids(tok, " fair") + [tok.eos_token_id]


def test_conversational_pairs_follow_the_chat_template(chat):
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say love"}]
    chosen = [{"role": "assistant", "content": "love love"}]
    encoder = PairEncoder(chat, max_length=128)
    pair, cut = encoder.encode(prompt, chosen, "hate", "row 0")  # a string answer is an assistant message
    assert not cut
    rendered = chat.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert pair["prompt_ids"] == _ids(chat, rendered)
    whole = chat.apply_chat_template(prompt + chosen, tokenize=False)
    assert chat.decode(pair["prompt_ids"] + pair["chosen_ids"]) == whole.rstrip("\n")  # up to <|end|>
    assert chat.decode(pair["rejected_ids"]) == "hate<|end|>"
    # a string prompt is one user message
    same, _ = encoder.encode("say love", chosen, "hate", "row 1")
    single, _ = encoder.encode([{"role": "user", "content": "say love"}], chosen, "hate", "row 2")
    assert same == single


def test_conversational_rows_from_a_file(tmp_path, chat):
    rows = [{"prompt": [{"role": "user", "content": "say love"}],
             "chosen": [{"role": "assistant", "content": "love"}],
             "rejected": [{"role": "assistant", "content": "hate"}]}]
    data = load_preference_pairs(str(_write(tmp_path, rows)), "train", chat, max_length=64)
    assert data.conversational and len(data.pairs) == 1
    assert chat.decode(data.pairs[0]["chosen_ids"]) == "love<|end|>"


def test_truncation_prompt_first_keeps_the_end_of_the_prompt(tok):
    prompt, chosen, rejected = (_ids(tok, t) for t in ("a b c d e f g h", " love", " hate and more hate"))
    limit = len(prompt) + len(rejected) + 1 - 3  # 3 tokens too long
    pair, cut = PairEncoder(tok, max_length=limit).encode("a b c d e f g h", " love", " hate and more hate", "row")
    assert cut
    assert pair["prompt_ids"] == prompt[3:]
    assert pair["chosen_ids"] == chosen + [tok.eos_token_id] and pair["rejected_ids"] == rejected + [tok.eos_token_id]
    assert len(pair["prompt_ids"]) + len(pair["rejected_ids"]) == limit
    # a completion longer than the limit: the prompt keeps one token, the completions their start
    pair, cut = PairEncoder(tok, max_length=4).encode("a b c d e f g h", " love", " hate and more hate", "row")
    assert cut and pair["prompt_ids"] == prompt[-1:]
    assert pair["rejected_ids"] == rejected[:3] and pair["chosen_ids"] == (chosen + [tok.eos_token_id])[:3]


def test_truncation_completion_first_keeps_the_prompt(tok):
    prompt, rejected = _ids(tok, "a b c d e f g h"), _ids(tok, " hate and more hate")
    limit = len(prompt) + 3
    pair, cut = PairEncoder(tok, max_length=limit, truncation="completion_first").encode(
        "a b c d e f g h", " love", " hate and more hate", "row")
    assert cut and pair["prompt_ids"] == prompt and pair["rejected_ids"] == rejected[:3]
    # a prompt longer than the limit: completions keep one token, the prompt its end
    pair, _ = PairEncoder(tok, max_length=3, truncation="completion_first").encode(
        "a b c d e f g h", " love", " hate and more hate", "row")
    assert pair["prompt_ids"] == prompt[-2:] and pair["rejected_ids"] == rejected[:1]


def test_truncated_pairs_are_counted_and_identical_ones_dropped(tmp_path, tok):
    rows = [{"prompt": "a b", "chosen": " love love love", "rejected": " love love hate"},  # same start
            {"prompt": "a b c d e f g h i j k l", "chosen": "x", "rejected": "y"},
            {"prompt": "a", "chosen": "x", "rejected": "y"}]
    limit = len(_ids(tok, "a b")) + len(_ids(tok, " love love"))
    assert len(_ids(tok, "a b c d e f g h i j k l")) + 2 > limit  # row 1 is cut too, but stays different
    data = load_preference_pairs(str(_write(tmp_path, rows)), "train", tok, max_length=limit,
                                 truncation="completion_first")
    assert (data.rows, data.truncated, data.dropped, len(data.pairs)) == (3, 2, 1, 2)
    assert data.pairs[0]["chosen_ids"] == _ids(tok, "x")[:1] and data.pairs[0]["rejected_ids"] == _ids(tok, "y")[:1]
    assert data.pairs[1]["chosen_ids"] == _ids(tok, "x") + [tok.eos_token_id]


def test_collator_puts_chosen_rows_first_and_scores_completions_only(tok):
    pairs = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8], "rejected_ids": [9, 10]},
             {"prompt_ids": [11], "chosen_ids": [12, 13, 14], "rejected_ids": [15],
              "ref_chosen_logps": -1.5, "ref_rejected_logps": -2.5}]
    pairs[0].update(ref_chosen_logps=-0.5, ref_rejected_logps=-3.0)
    batch = PreferenceCollator(pad_token_id=0)(pairs)
    P = IGNORE_INDEX
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 0], [11, 12, 13, 14, 0], [5, 6, 7, 9, 10], [11, 15, 0, 0, 0]]
    assert batch["labels"].tolist() == [[P, P, P, 8, P], [P, 12, 13, 14, P], [P, P, P, 9, 10], [P, 15, P, P, P]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["ref_chosen_logps"].tolist() == [-0.5, -1.5] and batch["ref_rejected_logps"].tolist() == [-3.0, -2.5]


# ----------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "a", "chosen": " love", "rejected": " love"}, "row 1: the chosen and the rejected completion are the same"),
    ({"prompt": "a", "chosen": "", "rejected": " love"}, "row 1: the chosen completion is empty"),
    ({"prompt": "a", "chosen": " love", "rejected": "   "}, "row 1: the rejected completion is empty"),
    ({"prompt": "a", "chosen": None, "rejected": " love"}, "row 1: the chosen is missing"),
    ({"prompt": "", "chosen": " a", "rejected": " b"}, "row 1: the prompt is empty"),
])
def test_bad_rows_are_refused_by_row(tmp_path, tok, row, message):
    rows = [{"prompt": "x", "chosen": " y", "rejected": " z"}, row]
    with pytest.raises(LmforgeError, match=message.replace("(", r"\(")):
        load_preference_pairs(Dataset.from_list(rows), "train", tok, max_length=32)


def test_a_completion_that_is_neither_text_nor_messages_is_refused(tok):
    with pytest.raises(LmforgeError, match="row 7: the chosen is 3; expected text or a list of"):
        PairEncoder(tok, max_length=32).encode("a", 3, " b", "row 7")


def test_missing_columns_are_named_with_the_columns_present(tmp_path, tok):
    folder = _write(tmp_path, [{"question": "a", "chosen": " b", "worse": " c"}])
    with pytest.raises(LmforgeError, match=r"\(split 'train'\): no prompt column 'prompt' and no rejected column "
                                           r"'rejected'; the columns are question, chosen, worse"):
        load_preference_pairs(str(folder), "train", tok, max_length=32)
    data = load_preference_pairs(str(folder), "train", tok, max_length=32, prompt_column="question",
                                 rejected_column="worse")
    assert len(data.pairs) == 1


def test_conversations_need_a_chat_template(tok):
    with pytest.raises(LmforgeError, match="row 0: tokenizer .* has no chat template"):
        PairEncoder(tok, max_length=32).encode([{"role": "user", "content": "hi"}], "a", "b", "row 0")


def test_a_conversation_that_does_not_end_with_the_assistant_is_refused(chat):
    with pytest.raises(LmforgeError, match="the chosen conversation ends with a 'user' message"):
        PairEncoder(chat, max_length=32).encode("hi", [{"role": "user", "content": "a"}], "b", "row 0")


def test_built_in_review_pairs_prefer_the_positive_sentence_with_the_same_start():
    from lmforge.data.fetch import preference_pairs

    rows = [{"text": "The film is a delight from start to end", "label": 1},
            {"text": "The film is a mess from start to end", "label": 0},
            {"text": "The film is a bore from start to end", "label": 1},  # labelled both ways: left out
            {"text": "The film is a bore from start to end", "label": 0},
            {"text": "A joy to watch all the way", "label": 1},
            {"text": "Too short", "label": 0}]
    pairs = preference_pairs(rows, seed=0)
    assert pairs, pairs
    for pair in pairs:
        positive = pair["prompt"] + pair["chosen"]
        negative = pair["prompt"] + pair["rejected"]
        assert {"text": positive, "label": 1} in rows and {"text": negative, "label": 0} in rows
        assert len(pair["prompt"].split()) == pair["prefix_words"] and pair["chosen"].startswith(" ")
        assert "bore" not in positive + negative
    # "The film is a delight ..." pairs with "The film is a mess ..." for every prefix of 1-4 words
    assert sorted(p["prefix_words"] for p in pairs) == [1, 2, 3, 4]


def test_the_built_in_pairs_load_as_a_preference_source(tok):
    data = load_preference_pairs("rotten-tomatoes-pairs", "validation", tok, max_length=64)
    assert data.rows > 200 and len(data.pairs) + data.dropped == data.rows
