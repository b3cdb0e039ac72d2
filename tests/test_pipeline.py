"""build_lm_dataset: exact packing of a real file source, separators, cache reuse across runs,
streaming == non-streaming, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.data import pipeline
from lmforge.data.packing import unpack
from lmforge.data.pipeline import DocumentEncoder, build_lm_dataset, tokenizer_hash
from lmforge.errors import LmforgeError
from tests.pipeline_fixtures import bert_tokenizer, gpt_tokenizer, make_corpus

BLOCK = 48


@pytest.fixture(scope="module")
def tok():
    return gpt_tokenizer()


@pytest.fixture()
def corpus_file(tmp_path) -> tuple[Path, list[str]]:
    docs = make_corpus(250, seed=4)
    docs[5] = ""  # empty documents are skipped
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path, docs


def _rows(ds) -> dict[str, np.ndarray]:
    ds = ds.with_format("numpy") if isinstance(ds, Dataset) else ds
    rows = list(ds)
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _documents(rows: dict[str, np.ndarray], sep: int) -> list[tuple[int, ...]]:
    stream = unpack(rows).tolist()
    docs, cur = [], []
    for t in stream:
        if t == sep:
            docs.append(tuple(cur))
            cur = []
        else:
            cur.append(t)
    assert not cur  # the stream ends with a separator
    return docs


def test_packs_every_token_of_every_document(tok, corpus_file):
    path, docs = corpus_file
    ds = build_lm_dataset(str(path), tok, BLOCK, batch_size=64)
    assert set(ds.column_names) == {"input_ids", "attention_mask", "position_ids", "seq_idx"}
    rows = _rows(ds)
    assert rows["input_ids"].shape[1] == BLOCK
    expected = [tuple(tok(d, add_special_tokens=False)["input_ids"]) for d in docs if d]
    assert _documents(rows, tok.eos_token_id) == expected
    # one padded row at most per batch of 64 documents
    assert (rows["attention_mask"] == 0).any(axis=1).sum() <= -(-len(docs) // 64)


def test_bert_style_tokenizer_separates_with_sep(corpus_file):
    path, docs = corpus_file
    bert = bert_tokenizer()
    ds = build_lm_dataset(str(path), bert, BLOCK, document_masks=False)
    assert ds.column_names == ["input_ids", "attention_mask"]
    rows = _rows(ds)
    assert (rows["input_ids"] == bert.sep_token_id).sum() == sum(1 for d in docs if d)
    assert not np.isin(rows["input_ids"], [bert.cls_token_id, bert.mask_token_id]).any()


_FIRST_RUN = """
import sys
from transformers import AutoTokenizer
from lmforge.data.pipeline import build_lm_dataset
ds = build_lm_dataset(sys.argv[1], AutoTokenizer.from_pretrained(sys.argv[2]), {block})
print(ds.cache_files[0]["filename"])
"""


def test_second_run_reuses_the_cache(tok, corpus_file, tmp_path, monkeypatch):
    path, _ = corpus_file
    tok.save_pretrained(tmp_path / "tok")
    first = subprocess.run([sys.executable, "-c", _FIRST_RUN.format(block=BLOCK), str(path), str(tmp_path / "tok")],
                           capture_output=True, text=True, check=True)
    cache_file = Path(first.stdout.strip().splitlines()[-1])
    mtime = cache_file.stat().st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("tokenized again instead of loading the cache")

    monkeypatch.setattr(pipeline, "_tokenize_and_pack", must_not_run)
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert tokenizer_hash(reloaded) == tokenizer_hash(tok)
    ds = build_lm_dataset(str(path), reloaded, BLOCK)
    assert Path(ds.cache_files[0]["filename"]) == cache_file
    assert cache_file.stat().st_mtime_ns == mtime
    # a different block size is a different dataset: it must tokenize (and here, fail loudly)
    with pytest.raises(AssertionError, match="tokenized again"):
        build_lm_dataset(str(path), reloaded, BLOCK + 1)


def test_streaming_yields_the_same_rows(tok, corpus_file):
    path, _ = corpus_file
    eager = _rows(build_lm_dataset(str(path), tok, BLOCK, batch_size=100))
    streamed = _rows(build_lm_dataset(str(path), tok, BLOCK, batch_size=100, streaming=True))
    assert eager.keys() == streamed.keys()
    for k in eager:
        np.testing.assert_array_equal(eager[k], streamed[k])


def test_empty_after_filtering_is_an_error(tok):
    empty = Dataset.from_dict({"text": ["", "", ""]})
    with pytest.raises(LmforgeError, match="no tokens left"):
        build_lm_dataset(empty, tok, BLOCK)
    with pytest.raises(LmforgeError, match="no tokens left"):
        build_lm_dataset(empty.to_iterable_dataset(), tok, BLOCK, streaming=True)


def test_bad_inputs(tok, corpus_file):
    path, _ = corpus_file
    with pytest.raises(LmforgeError, match="block_size"):
        build_lm_dataset(str(path), tok, 1)
    with pytest.raises(LmforgeError, match="column"):
        build_lm_dataset(str(path), tok, BLOCK, text_column="body")
    no_sep = gpt_tokenizer()
    no_sep.eos_token = None
    with pytest.raises(LmforgeError, match="eos_token"):
        build_lm_dataset(str(path), no_sep, BLOCK)


# --------------------------------------------------------------------------- DocumentEncoder

_PIECES = [*"ab Z9'.,!-\n\t ", "  ", "é", "世", "🤗", "'s", "'ll", "<|endoftext|>", "\u00a0", "\r\n", " the"]
_TEXT = st.lists(st.sampled_from(_PIECES), max_size=40).map("".join)


def _bpe_on_pieces(add_prefix_space: bool):
    """A byte-level BPE trained on random mixes of the test pieces, so it has merges for
    whitespace runs ("ĠĠ", "ĊĠ", ...) and contractions: a wrong cut would change its output."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = ["".join(rng.choices(_PIECES, k=40)) for _ in range(3000)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    tok.add_tokens(["Z9"])  # a plain added token (no stripping) keeps the memoised path
    return tok


@pytest.fixture(scope="module")
def piece_tokenizers():
    toks = [_bpe_on_pieces(False), _bpe_on_pieces(True)]
    assert all(t.convert_tokens_to_ids("ĠĠ") != t.unk_token_id and "ĠĠ" in t.get_vocab() for t in toks)
    return toks


@settings(max_examples=150, deadline=None)
@given(texts=st.lists(_TEXT, min_size=1, max_size=8))
def test_document_encoder_equals_the_tokenizer(tok, piece_tokenizers, texts):
    texts = [t for t in texts if t]
    for tokenizer in (tok, *piece_tokenizers):
        encoder = DocumentEncoder(tokenizer)
        assert encoder.memoised  # the memoised path is the one under test
        plain = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
        assert encoder.ids(texts) == plain
        assert encoder.ids(texts[::-1]) == plain[::-1]  # and again, from the memo


def test_document_encoder_falls_back_when_cutting_could_change_tokens():
    from tokenizers import AddedToken

    assert not DocumentEncoder(bert_tokenizer()).memoised  # not byte-level
    stripping = gpt_tokenizer()
    stripping.add_special_tokens({"mask_token": AddedToken("<mask>", lstrip=True, rstrip=True)})
    assert not DocumentEncoder(stripping).memoised
