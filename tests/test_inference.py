"""The generation engine and its verbs: the fast GPT decode path gives token-for-token what
``generate()`` gives (odd prompt lengths, left-padded batches, every position type, compiled or
not), the engine's streaming, stop strings and limits, sampling settings, and ``lmforge generate``
/ ``lmforge chat`` end to end on saved GPT, Mamba, LoRA-adapter and chat models."""

from __future__ import annotations

import io
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lmforge.cli import main
from lmforge.inference import Engine, InferenceError, Sampling
from lmforge.inference.decoding import CacheDecoder, StaticGPTDecoder
from lmforge.models import LmforgeGPTConfig, LmforgeGPTForCausalLM
from tests.finetune_fixtures import save_base
from tests.pipeline_fixtures import gpt_tokenizer, make_corpus

VOCAB = 300


def gpt(seed: int = 0, **changes) -> LmforgeGPTForCausalLM:
    torch.manual_seed(seed)
    settings = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                    hidden_dropout=0.0, attention_dropout=0.0)
    return LmforgeGPTForCausalLM(LmforgeGPTConfig(**{**settings, **changes})).eval()


def padded_batch(lengths: list[int], seed: int = 0, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts of the given lengths: input_ids, attention_mask (B, max)."""
    g = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    ids = torch.full((len(lengths), longest), pad)
    mask = torch.zeros((len(lengths), longest), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, longest - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, longest - n:] = 1
    return ids, mask


def greedy(decoder, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    logits = decoder.start(ids, mask, steps)
    out = []
    for _ in range(steps):
        token = logits.argmax(-1)
        out.append(token)
        logits = decoder.step(token)
    return torch.stack(out, dim=1)


def reference(model, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:]


# --------------------------------------------------------------------------- the fast path == generate()


@pytest.mark.parametrize("changes", [
    {},  # RoPE, GQA, pre-RMSNorm, SwiGLU
    {"position_embedding_type": "learned", "norm_type": "layernorm", "hidden_act": "gelu", "attention_bias": True,
     "mlp_bias": True, "num_key_value_heads": 4},
    {"position_embedding_type": "sinusoidal", "norm_position": "post", "num_key_value_heads": 1},
    {"norm_position": "deepnorm", "tie_word_embeddings": False},
], ids=["rope-gqa", "learned-biases", "sinusoidal-post-mqa", "deepnorm-untied"])
@pytest.mark.parametrize("lengths", [[7], [13, 5, 9]], ids=["odd-length", "left-padded"])
def test_static_decoder_greedy_equals_generate(changes, lengths):
    model = gpt(**changes)
    ids, mask = padded_batch(lengths)
    want = reference(model, ids, mask, 40)
    assert torch.equal(greedy(StaticGPTDecoder(model), ids, mask, 40), want)


def test_compiled_step_equals_generate_and_leaves_the_model_alone():
    model = gpt(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = padded_batch([11, 4])
    want = reference(model, ids, mask, 30)
    decoder = StaticGPTDecoder(model, compile=True)
    assert torch.equal(greedy(decoder, ids, mask, 30), want)
    ids2, mask2 = padded_batch([3, 9], seed=5)  # same bucket: the compiled step is reused, cache reset
    assert torch.equal(greedy(decoder, ids2, mask2, 30), reference(model, ids2, mask2, 30))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(type(m).__name__ != "DecodeLinear" for m in model.modules())


def test_a_step_that_fails_to_compile_runs_eagerly_from_then_on(caplog):
    from lmforge.inference.decoding import CompiledStep

    calls, undone = [], []
    run = CompiledStep(lambda x: calls.append(x) or x + 1, compile=False)

    def broken(x):
        raise RuntimeError("inductor: no C++ compiler\nmore detail")

    run.compiled = broken
    with caplog.at_level("WARNING", logger="lmforge.inference.decoding"):
        assert run(1, undo=lambda: undone.append(True)) == 2
    assert "torch.compile failed (inductor: no C++ compiler)" in caplog.text
    assert undone == [True] and run.compiled is None
    assert run(5) == 6 and calls == [1, 5]


def test_static_decoder_logits_equal_the_full_forward():
    model = gpt(seed=2)
    ids, mask = padded_batch([9, 6], seed=3)
    decoder = StaticGPTDecoder(model)
    logits = decoder.start(ids, mask, 8)
    seq, full_mask = ids, mask
    for _ in range(8):
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        want = model(seq, attention_mask=full_mask, position_ids=positions).logits[:, -1]
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
        token = logits.argmax(-1)
        seq = torch.cat([seq, token[:, None]], 1)
        full_mask = torch.cat([full_mask, torch.ones_like(token)[:, None]], 1)
        logits = decoder.step(token)


def test_static_cache_sizes_past_the_context_are_refused():
    model = gpt(max_position_embeddings=32)
    decoder = StaticGPTDecoder(model)
    ids, mask = padded_batch([5])
    logits = decoder.start(ids, mask, 2)
    for _ in range(32 - 5):  # the cache is bucketed to 64 slots, but not past the context
        logits = decoder.step(logits.argmax(-1))
    with pytest.raises(RuntimeError, match="static cache holds 32"):
        decoder.step(logits.argmax(-1))


def test_int8_weights_stay_close_and_share_nothing_with_the_model():
    model = gpt(seed=3)
    ids, mask = padded_batch([12, 7])
    float_logits = StaticGPTDecoder(model).start(ids, mask, 4)
    int8 = StaticGPTDecoder(model, weights="int8")
    int8_logits = int8.start(ids, mask, 4)
    assert (int8_logits - float_logits).abs().max() < 0.05 * float_logits.abs().max()
    assert (int8_logits - float_logits).abs().max() > 0  # it really quantised
    linear = int8.model.model.layers[0].self_attn.q_proj
    assert linear.weight.dtype == torch.int8 and model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


@pytest.mark.parametrize("stock", ["llama", "gpt2"])
def test_cache_decoder_equals_generate_on_stock_models(stock):
    torch.manual_seed(0)
    if stock == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=128))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, bos_token_id=1,
                                           eos_token_id=1))
    model.eval()
    ids, mask = padded_batch([10, 3])
    assert torch.equal(greedy(CacheDecoder(model), ids, mask, 20), reference(model, ids, mask, 20))


def test_alibi_models_decode_through_their_own_forward():
    model = gpt(position_embedding_type="alibi")
    engine = Engine(model, gpt_tokenizer(make_corpus(50), vocab_size=VOCAB))
    assert isinstance(engine.decoder, CacheDecoder)
    ids, mask = padded_batch([8, 5])
    assert torch.equal(greedy(engine.decoder, ids, mask, 12), reference(model, ids, mask, 12))


# --------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def tokenizer():
    return gpt_tokenizer(make_corpus(200), vocab_size=VOCAB)


@pytest.fixture(scope="module")
def engine(tokenizer):
    return Engine(gpt(seed=4), tokenizer, name="tiny")


def test_engine_answers_are_generate_continuations(engine, tokenizer):
    prompts = ["the king", "o sweet love and fair"]
    got = engine.complete(prompts, Sampling(max_new_tokens=15, greedy=True), stop_ids=[])
    enc = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    out = engine.model.generate(**enc, max_new_tokens=15, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=None)
    for i, completion in enumerate(got):
        assert completion.text == tokenizer.decode(out[i, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert completion.completion_tokens == 15 and completion.finish_reason == "length"
        assert completion.prompt_tokens == len(tokenizer(prompts[i])["input_ids"])


def test_streamed_text_adds_up_to_the_answer(engine):
    sampling = Sampling(max_new_tokens=25, seed=3, temperature=0.9)
    whole = engine.complete(["fair"], sampling)[0].text
    pieces = [d.text for deltas in engine.stream(["fair"], sampling) for d in deltas]
    assert "".join(pieces) == whole and len([p for p in pieces if p]) > 1


def test_stop_strings_cut_the_text_and_end_it(engine):
    free = engine.complete(["the"], Sampling(max_new_tokens=30, greedy=True), stop_ids=[])[0]
    at = next(i for i in range(3, len(free.text) - 1) if "\ufffd" not in free.text[i:i + 2])
    stop = free.text[at:at + 2]
    cut = engine.complete(["the"], Sampling(max_new_tokens=30, greedy=True, stop=(stop,)), stop_ids=[])[0]
    assert cut.text == free.text[:free.text.find(stop)] and cut.finish_reason == "stop"
    streamed = "".join(d.text for deltas in engine.stream(["the"], Sampling(max_new_tokens=30, greedy=True,
                                                                            stop=(stop,)), stop_ids=[])
                       for d in deltas)
    assert streamed == cut.text  # nothing of the stop string leaked out while streaming


def test_stop_tokens_end_each_row_separately(engine, tokenizer):
    prompts = ["the", "sweet"]
    enc = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    out = engine.model.generate(**enc, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=None)[:, enc["input_ids"].shape[1]:].tolist()
    stop_id = out[0][3]  # a token row 0 produces early
    first = out[0].index(stop_id)
    got = engine.complete(prompts, Sampling(max_new_tokens=20, greedy=True), stop_ids=[stop_id])
    assert got[0].finish_reason == "stop" and got[0].completion_tokens == first
    assert got[0].text == tokenizer.decode(out[0][:first])
    second = out[1].index(stop_id) if stop_id in out[1] else 20
    assert got[1].completion_tokens == second and got[1].text == tokenizer.decode(out[1][:second])
    assert got[1].finish_reason == ("stop" if second < 20 else "length")


class Scripted:
    """A decoder that "generates" the given tokens in order (greedy picks them)."""

    def __init__(self, tokens: list[int], vocab: int = VOCAB):
        self.tokens, self.vocab = tokens, vocab

    def start(self, ids, mask, steps):
        self.n = 0
        return self.logits()

    def step(self, tokens):
        self.n += 1
        return self.logits()

    def logits(self):
        out = torch.zeros(1, self.vocab)
        out[0, self.tokens[min(self.n, len(self.tokens) - 1)]] = 1.0
        return out


@pytest.mark.parametrize("algorithm", ["bpe", "wordpiece", "unigram"])
def test_streamed_text_is_the_full_decoding_for_every_tokenizer_kind(algorithm):
    """The text is decoded a few tokens at a time; it must add up to decoding all the tokens at
    once, whatever the tokenizer's decoder does at word starts (Ġ, ##, ▁, byte fallback)."""
    from lmforge.tokenizers.train import train_tokenizer

    tok = train_tokenizer(make_corpus(200) + ["crème brûlée 🤗 данные"], algorithm, 400, show_progress=False)
    text = "o sweet love, crème brûlée 🤗 the kingdoms данные fair ##x  two  spaces"
    ids = [i for i in tok(text, add_special_tokens=False)["input_ids"]]
    ids = ids + ids[::-1]  # unusual orders too
    engine = Engine(gpt(vocab_size=len(tok)), tok, decoder=Scripted(ids, len(tok)))
    pieces = [d.text for deltas in engine.stream(["a"], Sampling(max_new_tokens=len(ids), greedy=True),
                                                 stop_ids=[]) for d in deltas]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert len([p for p in pieces if p]) > len(ids) // 3  # it streamed


def test_a_character_split_across_tokens_is_never_streamed_broken(tokenizer):
    byte_tokens = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.tokenize("🤗")]
    assert len(byte_tokens) > 1
    engine = Engine(gpt(), tokenizer, decoder=Scripted(byte_tokens))  # a 4-byte character, a token a byte
    pieces = [d.text for deltas in engine.stream(["a"], Sampling(max_new_tokens=len(byte_tokens), greedy=True),
                                                 stop_ids=[]) for d in deltas]
    assert [p for p in pieces if p] == ["🤗"]


def test_the_context_limits_prompt_and_answer(tokenizer):
    engine = Engine(gpt(max_position_embeddings=24), tokenizer)
    with pytest.raises(InferenceError, match="context is 24 tokens"):
        engine.complete([list(range(3, 30))], Sampling(max_new_tokens=4))
    got = engine.complete([list(range(3, 13))], Sampling(max_new_tokens=100, greedy=True), stop_ids=[])[0]
    assert got.completion_tokens == 24 - 10 and got.finish_reason == "length"


def test_warm_up_leaves_no_trace_in_answers(tokenizer):
    engine = Engine(gpt(seed=6), tokenizer)
    before = engine.complete(["the", "o sweet"], Sampling(max_new_tokens=12, greedy=True))
    engine.warm_up()  # runs at the short and the whole-context cache lengths
    assert engine.complete(["the", "o sweet"], Sampling(max_new_tokens=12, greedy=True)) == before


def test_sampling_is_repeatable_by_seed_and_temperature_zero_is_greedy(engine):
    def text(**kw):
        return engine.complete(["love"], Sampling(max_new_tokens=20, **kw), stop_ids=[])[0].text

    assert text(seed=7, temperature=1.5) == text(seed=7, temperature=1.5)
    assert text(seed=7, temperature=1.5) != text(seed=8, temperature=1.5)
    assert text(temperature=0.0) == text(greedy=True)
    assert text(greedy=True, repetition_penalty=1.5) != text(greedy=True)


@pytest.mark.parametrize("field, value", [("max_new_tokens", 0), ("temperature", -1.0), ("top_p", 0.0),
                                          ("top_k", -1), ("repetition_penalty", 0.0)])
def test_bad_sampling_settings_are_named(field, value):
    with pytest.raises(ValueError, match=f"{field}={value}"):
        Sampling(**{field: value})


# --------------------------------------------------------------------------- the verbs


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {family: save_base(root / family, family) for family in ("gpt", "mamba", "bert")} | {
        "chat": save_base(root / "chat", "gpt", chat=True, max_position_embeddings=256)}


def _greedy_text(folder, prompt: str, n: int) -> str:
    engine = Engine.load(folder, compile="no")
    return engine.complete([prompt], Sampling(max_new_tokens=n, greedy=True))[0].text


@pytest.mark.parametrize("family", ["gpt", "mamba"])
def test_generate_verb_prints_prompt_and_continuation(saved, family, capsys):
    assert main(["generate", str(saved[family]), "--prompt", "the king", "--greedy", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == "the king" + _greedy_text(saved[family], "the king", 12) + "\n"


def test_generate_verb_batches_prompts_in_order(saved, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("fair\n\nthe sweet\n")
    assert main(["generate", str(saved["gpt"]), "--prompt", "love", "--prompt-file", str(prompts), "--greedy",
                 "--max-new-tokens", "6", "--no-echo"]) == 0
    out = capsys.readouterr().out
    want = "".join(f"--- {i + 1} ---\n{_greedy_text(saved['gpt'], p, 6)}\n" for i, p in
                   enumerate(["love", "fair", "the sweet"]))
    assert out == want


def test_generate_verb_runs_an_adapter_on_its_base(saved, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from lmforge.runs import load_model

    base = load_model(saved["gpt"]).model
    torch.manual_seed(0)
    adapted = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapted.save_pretrained(tmp_path / "adapter")
    adapted.peft_config["default"].base_model_name_or_path = str(saved["gpt"])
    adapted.peft_config["default"].save_pretrained(tmp_path / "adapter")
    merged = adapted.merge_and_unload()
    want = Engine(merged, load_model(saved["gpt"]).tokenizer).complete(
        ["the"], Sampling(max_new_tokens=10, greedy=True))[0].text
    assert want != _greedy_text(saved["gpt"], "the", 10)  # the adapter changes the answer
    assert main(["generate", str(tmp_path / "adapter"), "--prompt", "the", "--greedy", "--max-new-tokens", "10",
                 "--no-echo", "--compile", "no"]) == 0
    assert capsys.readouterr().out == want + "\n"


def test_generate_verb_refuses_bert_and_bad_flags(saved, capsys):
    assert main(["generate", str(saved["bert"]), "--prompt", "x"]) == 2
    assert "masked language model" in capsys.readouterr().err
    assert main(["generate", str(saved["gpt"]), "--prompt", "x", "--top-p", "0"]) == 2
    assert "--top-p 0.0: must be in (0, 1]" in capsys.readouterr().err
    assert main(["generate", str(saved["gpt"])]) == 2
    assert "give a prompt" in capsys.readouterr().err


@pytest.mark.parametrize("weights, dtype", [("int8", "float32"), ("float", "bfloat16")])
def test_generate_verb_lower_precision(saved, weights, dtype, capsys):
    assert main(["generate", str(saved["gpt"]), "--prompt", "the", "--greedy", "--max-new-tokens", "8",
                 "--weights", weights, "--dtype", dtype]) == 0
    assert capsys.readouterr().out.startswith("the")


def test_chat_verb_keeps_history_and_obeys_commands(saved, monkeypatch, capsys):
    engine = Engine.load(saved["chat"], compile="no")
    sampling = Sampling(max_new_tokens=8, greedy=True)

    def answer(messages):
        return engine.complete([engine.chat_prompt(messages)], sampling, stop_ids=engine.chat_stop_ids)[0].text

    first = answer([{"role": "user", "content": "hello"}])
    second = answer([{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                     {"role": "user", "content": "more"}])
    fresh = answer([{"role": "system", "content": "be brief"}, {"role": "user", "content": "more"}])
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nmore\n/reset\n/system be brief\nmore\n/nope\n"))
    assert main(["chat", str(saved["chat"]), "--greedy", "--max-new-tokens", "8", "--compile", "no"]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines() == [first, second, fresh]
    assert "conversation forgotten" in out.err and "unknown command /nope" in out.err


def test_chat_verb_needs_a_chat_template(saved, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", str(saved["gpt"]), "--compile", "no"]) == 2
    err = capsys.readouterr().err
    assert "no chat template" in err and "lmforge finetune --config chat-sft" in err  # a preset that exists


def test_int8_perplexity_change_is_small():
    """Weight-only int8 keeps the next-token distribution: perplexity of the float model's own
    greedy text moves by well under 1% on a random model."""
    model = gpt(seed=5)
    ids, mask = padded_batch([40, 40], seed=9)
    nll = {}
    for weights in ("float", "int8"):
        decoder = StaticGPTDecoder(model, weights=weights)
        logits = decoder.start(ids[:, :1], mask[:, :1], 39)
        total = 0.0
        for t in range(1, 40):
            total += torch.nn.functional.cross_entropy(logits, ids[:, t]).item()
            logits = decoder.step(ids[:, t])
        nll[weights] = total / 39
    assert abs(math.exp(nll["int8"]) / math.exp(nll["float"]) - 1) < 0.01


@pytest.mark.parametrize("stock", ["llama", "gpt2", "mamba"])
def test_stock_checkpoints_decode_on_the_fast_path(stock, tmp_path, tokenizer):
    from transformers import MambaConfig, MambaForCausalLM

    from lmforge.inference.decoding import MambaDecoder

    torch.manual_seed(0)
    if stock == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=128))
    elif stock == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=96,
                                           bos_token_id=0, eos_token_id=0))
    else:
        model = MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, state_size=8))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = Engine.load(tmp_path, compile="no")
    assert isinstance(engine.decoder, MambaDecoder if stock == "mamba" else StaticGPTDecoder)
    ids, mask = padded_batch([9, 4])
    model.eval()
    assert torch.equal(greedy(engine.decoder, ids, mask, 20), reference(model, ids, mask, 20))
