"""``lmforge convert --to-gguf``: a GGUF file read back by transformers' GGUF loader (which undoes
llama.cpp's layouts: the rotary permutation, GPT-2's transposes, Mamba's ``A = -exp(A_log)``) gives
the original logits and greedy tokens, its tokenizer encodes like the original, its metadata is what
llama.cpp reads (checked with gguf's reader), quantised weights stay within their block error, and
what GGUF cannot hold is refused before anything is written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.export.gguf_file import export_gguf
from lmforge.export.ollama import go_template, modelfile
from lmforge.models import (
    LmforgeBertConfig,
    LmforgeBertForSequenceClassification,
    LmforgeBertModel,
    LmforgeGPTConfig,
    LmforgeGPTForCausalLM,
    LmforgeGPTForSequenceClassification,
    LmforgeMambaConfig,
    LmforgeMambaForCausalLM,
)
from tests.finetune_fixtures import chat_tokenizer
from tests.pipeline_fixtures import bert_tokenizer, make_corpus
from tests.torch_threads import single_thread  # noqa: F401
from tests.train_fixtures import perturb

pytestmark = pytest.mark.usefixtures("single_thread")

TEXT = "To be, or not to be: héllo 世界 🤗\tTHE KING  double  spaces \n\n<|user|>\nhi<|end|>\n"


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()  # byte-level BPE with special role tokens and a chat template


def _ids(tok) -> dict:
    return dict(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def _gpt(tok, **changes):
    values = dict(vocab_size=len(tok) + 5, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96, rope_theta=500.0,
                  norm_eps=1e-5, **_ids(tok))
    return LmforgeGPTForCausalLM(LmforgeGPTConfig(**{**values, **changes}))


GPT2_STYLE = dict(position_embedding_type="learned", norm_type="layernorm", hidden_act="gelu_tanh", norm_bias=True,
                  attention_bias=True, mlp_bias=True, num_key_value_heads=4, tie_word_embeddings=True)

CAUSAL = {  # name -> (build(tok), GGUF architecture, stock class)
    "llama-gqa-untied": (lambda tok: _gpt(tok), "llama", "LlamaForCausalLM"),
    "llama-mqa-tied-headdim-biases": (lambda tok: _gpt(tok, num_key_value_heads=1, head_dim=24, tie_word_embeddings=True,
                                                       attention_bias=True, mlp_bias=True),
                                      "llama", "LlamaForCausalLM"),
    "gpt2-style": (lambda tok: _gpt(tok, **GPT2_STYLE), "gpt2", "GPT2LMHeadModel"),
    "mamba": (lambda tok: LmforgeMambaForCausalLM(LmforgeMambaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, state_size=8, **_ids(tok))), "mamba",
        "MambaForCausalLM"),
}


def _save(folder: Path, model, tok) -> Path:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _read_back(path: Path):
    """The GGUF file loaded by transformers. Its config mapping reads neither GPT-2's context length
    into n_positions nor its MLP width into n_inner, nor whether a Llama has biases (llama.cpp knows
    from the tensors): they are filled in from the file's own metadata and tensor names."""
    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if config.model_type == "llama":
        names = _tensors(path)
        config.attention_bias, config.mlp_bias = "blk.0.attn_q.bias" in names, "blk.0.ffn_up.bias" in names
    if config.model_type == "gpt2":
        fields = _fields(path)
        config.n_positions = fields["gpt2.context_length"]
        config.n_inner = fields["gpt2.feed_forward_length"]
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config).eval()


# ----------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", list(CAUSAL))
def test_f32_gguf_gives_the_logits_greedy_tokens_and_tokenizer_of_the_model(tmp_path, tok, name):
    build, arch, stock = CAUSAL[name]
    model = perturb(build(tok)).eval()
    folder = _save(tmp_path / "model", model, tok)
    out = tmp_path / "out" / "model.gguf"

    done = export_gguf(folder, out, dtype="f32")
    assert done.architecture == arch and done.tensor_types.keys() == {"F32"} and out.is_file()

    back = _read_back(out)
    assert type(back).__name__ == stock
    ids = torch.randint(0, len(tok), (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(ids).logits, back(ids).logits
    assert expected.shape == got.shape
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()

    prompt = ids[:1, :5]
    settings = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(back.generate(prompt, **settings), model.generate(prompt, **settings))

    read_tok = transformers.AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    assert read_tok(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    assert read_tok.decode(tok(TEXT)["input_ids"]) == TEXT


def test_llama_metadata_is_what_llama_cpp_reads(tmp_path, tok):
    model = _gpt(tok, num_key_value_heads=1, head_dim=24, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                          "rope_theta": 500.0})
    out = tmp_path / "m.gguf"
    export_gguf(_save(tmp_path / "model", model, tok), out, dtype="f16")
    fields = _fields(out)
    expected = {
        "general.architecture": "llama", "general.file_type": gguf.LlamaFileType.MOSTLY_F16,
        "llama.context_length": 96, "llama.embedding_length": 64, "llama.block_count": 2,
        "llama.feed_forward_length": 96, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 1,
        "llama.attention.key_length": 24, "llama.attention.value_length": 24, "llama.rope.dimension_count": 24,
        "llama.rope.freq_base": 500.0, "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0,
        "llama.vocab_size": len(tok) + 5, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.eos_token_id": tok.eos_token_id, "tokenizer.ggml.padding_token_id": tok.pad_token_id,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": tok.chat_template,
    }
    assert {key: fields.get(key) for key in expected} == pytest.approx(expected)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == len(tok) + 5  # padded to the model's vocabulary
    assert tokens[-5:] == [f"[PAD{i}]" for i in range(len(tok), len(tok) + 5)] and set(types[-5:]) == {5}
    for special in ("<|user|>", "<|end|>", tok.eos_token):
        assert types[tok.convert_tokens_to_ids(special)] == gguf.TokenType.CONTROL
    tensors = _tensors(out)
    assert "output.weight" in tensors and tensors["blk.0.attn_k.weight"].shape.tolist() == [64, 24]


def test_mamba_and_gpt2_metadata_and_layouts(tmp_path, tok):
    mamba = perturb(CAUSAL["mamba"][0](tok)).eval()
    out = tmp_path / "mamba.gguf"
    export_gguf(_save(tmp_path / "mamba", mamba, tok), out, dtype="f32")
    fields = _fields(out)
    c = mamba.config
    assert {k.removeprefix("mamba."): fields[k] for k in fields if k.startswith("mamba.ssm.")} == {
        "ssm.conv_kernel": c.conv_kernel, "ssm.inner_size": c.intermediate_size, "ssm.state_size": c.state_size,
        "ssm.time_step_rank": c.time_step_rank, "ssm.dt_b_c_rms": False}
    assert fields["mamba.attention.layer_norm_rms_epsilon"] == pytest.approx(c.norm_eps)
    tensors = _tensors(out)
    layer = mamba.backbone.layers[1].mixer
    a = torch.from_numpy(np.array(tensors["blk.1.ssm_a"].data)).reshape(layer.A_log.shape)
    assert torch.allclose(a, -torch.exp(layer.A_log.detach()))  # llama.cpp stores A, not its log
    conv = np.array(tensors["blk.1.ssm_conv1d.weight"].data)
    assert conv.shape == (c.intermediate_size, c.conv_kernel)
    assert torch.equal(torch.from_numpy(conv), layer.conv1d.weight.detach().squeeze(1))
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd

    gpt2 = perturb(_gpt(tok, **GPT2_STYLE)).eval()
    out = tmp_path / "gpt2.gguf"
    export_gguf(_save(tmp_path / "gpt2", gpt2, tok), out, dtype="f32")
    fields = _fields(out)
    assert (fields["gpt2.context_length"], fields["gpt2.embedding_length"], fields["gpt2.feed_forward_length"],
            fields["gpt2.attention.head_count"], fields["gpt2.block_count"]) == (96, 64, 96, 4, 2)
    qkv = np.array(_tensors(out)["blk.0.attn_qkv.weight"].data)
    attn = gpt2.model.layers[0].self_attn
    fused = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
    assert torch.equal(torch.from_numpy(qkv), fused)  # (out, in), as every llama.cpp matrix


# ------------------------------------------------------------------------------------- dtypes


BOUNDS = {"f16": 1e-3, "bf16": 8e-3, "q8_0": 1 / 127, "q4_0": 1 / 7}
MATRIX_TYPES = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}


@pytest.mark.parametrize("dtype", list(BOUNDS))
@pytest.mark.parametrize("name", ["llama-gqa-untied", "gpt2-style", "mamba"])
def test_every_dtype_stays_within_its_rounding_error(tmp_path, tok, name, dtype):
    """Each weight read back differs from the original by at most a bound x the largest |weight| of its
    tensor (q8_0: half a step of 127 levels per block, q4_0: of 8); vectors and norms stay exact (f32)."""
    model = perturb(CAUSAL[name][0](tok)).eval()
    out = tmp_path / "m.gguf"
    done = export_gguf(_save(tmp_path / "model", model, tok), out, dtype=dtype)
    types = {t.name: t.tensor_type.name for t in _tensors(out).values()}
    assert {types[n] for n in types if n.endswith("_norm.weight")} == {"F32"}
    matrix = "blk.0.ssm_in.weight" if name == "mamba" else "blk.0.ffn_down.weight"
    assert types[matrix] == MATRIX_TYPES[dtype]
    head = "output.weight" if "output.weight" in types else "token_embd.weight"  # tied: the embedding
    assert types[head] == ("Q8_0" if dtype == "q4_0" else MATRIX_TYPES[dtype])  # the head kept finer
    assert sum(done.tensor_types.values()) == len(types)

    back = _read_back(out).state_dict()
    ours = _stock_state(model)
    assert ours.keys() == back.keys()
    errors = {k: ((back[k] - v).abs().max() / v.abs().max()).item() for k, v in ours.items()}
    assert max(errors.values()) <= BOUNDS[dtype], max(errors.items(), key=lambda kv: kv[1])
    assert all(errors[k] == 0.0 for k, v in ours.items() if v.ndim == 1), "vectors must stay float32"
    assert max(errors.values()) > 0  # something was rounded: the dtype was applied


@pytest.mark.parametrize("dtype", list(BOUNDS))
def test_bert_at_every_dtype(tmp_path, dtype):
    """BERT (which transformers cannot read from GGUF) dequantised with gguf's own code."""
    btok = bert_tokenizer(make_corpus(120))
    model = perturb(LmforgeBertModel(LmforgeBertConfig.from_preset(
        "classic", vocab_size=len(btok), hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, pad_token_id=btok.pad_token_id))).eval()
    out = tmp_path / "bert.gguf"
    export_gguf(_save(tmp_path / "model", model, btok), out, dtype=dtype)
    tensors = _tensors(out)
    layer = model.layers[0]
    for name, weight, kind in [("blk.0.ffn_up.weight", layer.mlp.up_proj.weight, MATRIX_TYPES[dtype]),
                               ("token_embd.weight", model.embeddings.word_embeddings.weight, MATRIX_TYPES[dtype]),
                               ("position_embd.weight", model.embeddings.position_embeddings.weight, "F32"),
                               ("blk.0.attn_q.bias", layer.self_attn.q_proj.bias, "F32")]:
        tensor = tensors[name]
        assert tensor.tensor_type.name == kind, name
        values = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
        error = ((values.reshape(weight.shape) - weight.detach()).abs().max() / weight.abs().max()).item()
        assert error <= (BOUNDS[dtype] if kind != "F32" else 0.0), (name, error)


def _stock_state(model) -> dict[str, torch.Tensor]:
    from lmforge.models.convert import to_hf

    return {k: v.detach() for k, v in to_hf(model).state_dict().items()}


def test_rows_that_do_not_split_into_blocks_fall_back_to_f16(tmp_path, tok):
    model = _gpt(tok, hidden_size=40, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    out = tmp_path / "m.gguf"
    export_gguf(_save(tmp_path / "model", model, tok), out, dtype="q8_0")
    types = {t.name: t.tensor_type.name for t in _tensors(out).values()}
    assert types["blk.0.attn_q.weight"] == "F16"  # rows of 40 values
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # rows of 64 values


def test_mamba_keeps_its_small_ssm_tensors_in_f32(tmp_path, tok):
    model = CAUSAL["mamba"][0](tok)
    out = tmp_path / "m.gguf"
    export_gguf(_save(tmp_path / "model", model, tok), out, dtype="q8_0")
    types = {t.name: t.tensor_type.name for t in _tensors(out).values()}
    for name in ("ssm_a", "ssm_d", "ssm_conv1d.weight", "ssm_x.weight", "ssm_dt.weight"):
        assert types[f"blk.0.{name}"] == "F32", name
    assert types["blk.0.ssm_in.weight"] == types["blk.0.ssm_out.weight"] == "Q8_0"


# ---------------------------------------------------------------------------- BERT, tokenizers


def test_bert_encoder_tensors_metadata_and_wordpiece_vocabulary(tmp_path):
    btok = bert_tokenizer(make_corpus(120))
    labels = {0: "neg", 1: "pos"}
    model = perturb(LmforgeBertForSequenceClassification(LmforgeBertConfig.from_preset(
        "classic", vocab_size=len(btok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=btok.pad_token_id, id2label=labels,
        label2id={v: k for k, v in labels.items()}))).eval()
    out = tmp_path / "bert.gguf"
    done = export_gguf(_save(tmp_path / "model", model, btok), out, dtype="f32")
    assert done.architecture == "bert" and done.modelfile is None and not out.with_suffix(".Modelfile").exists()
    assert any("head is not written" in note for note in done.notes)
    fields = _fields(out)
    assert (fields["bert.attention.causal"], fields["bert.pooling_type"], fields["tokenizer.ggml.model"],
            fields["bert.context_length"], fields["tokenizer.ggml.token_type_count"]) == (False, 1, "bert", 64, 2)
    assert fields["tokenizer.ggml.bos_token_id"] == btok.cls_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == btok.sep_token_id
    vocab = btok.convert_ids_to_tokens(list(range(len(btok))))
    spelled = fields["tokenizer.ggml.tokens"]
    for token, written in zip(vocab, spelled, strict=True):  # llama.cpp's phantom-space WordPiece
        if token in btok.all_special_tokens:
            assert written == token
        else:
            assert written == (token[2:] if token.startswith("##") else "\u2581" + token)
    tensors = _tensors(out)
    assert not any(name.startswith(("cls", "classifier", "pooler")) for name in tensors)
    layer = model.bert.layers[1]
    for name, weight in [("blk.1.attn_q.weight", layer.self_attn.q_proj.weight),
                         ("blk.1.layer_output_norm.bias", layer.mlp_norm.bias),
                         ("token_types.weight", model.bert.embeddings.token_type_embeddings.weight)]:
        assert torch.equal(torch.from_numpy(np.array(tensors[name].data)), weight.detach()), name


def test_a_cased_wordpiece_is_refused_since_llama_cpp_lowercases(tmp_path):
    from lmforge.tokenizers.train import train_tokenizer

    cased = train_tokenizer(make_corpus(100), algorithm="wordpiece", vocab_size=200)
    model = LmforgeBertConfig.from_preset("classic", vocab_size=len(cased), hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    folder = _save(tmp_path / "model", LmforgeBertForSequenceClassification(model), cased)
    with pytest.raises(LmforgeError, match=r"cased .*lowercase=False.*--lowercase"):
        export_gguf(folder, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_unigram_tokenizer_goes_in_as_llama_cpp_ugm_with_scores_and_byte_pieces(tmp_path):
    from lmforge.tokenizers.train import train_tokenizer

    utok = train_tokenizer(make_corpus(200) + ["héllo 世界 café"], algorithm="unigram", vocab_size=300)
    model = _gpt(utok, vocab_size=len(utok))
    out = tmp_path / "m.gguf"
    done = export_gguf(_save(tmp_path / "model", model, utok), out, dtype="f32")
    assert done.tokenizer == "t5" and any("no byte fallback" in note for note in done.notes)
    fields = _fields(out)
    pieces = json.loads(utok.backend_tokenizer.to_str())["model"]["vocab"]
    assert fields["tokenizer.ggml.tokens"] == [piece for piece, _ in pieces]
    assert fields["tokenizer.ggml.scores"] == pytest.approx([score for _, score in pieces])
    types = dict(zip(fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"], strict=True))
    assert types["<0x41>"] == gguf.TokenType.BYTE and types[utok.eos_token] == gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.add_space_prefix"] is False


# ------------------------------------------------------------------------------------ Modelfile


def _render_go(template: str, messages: list[dict]) -> str:
    """The Go template constructs ``go_template`` writes, evaluated: a range over .Messages with an
    if / else-if chain on .Role, then literal text."""
    body, tail = re.fullmatch(r"\{\{- range \.Messages \}\}(.*)\{\{ end \}\}\{\{ end \}\}(.*)", template, re.S).groups()
    branches = dict(re.findall(r'\{\{ (?:else )?if eq \.Role "(\w+)" \}\}(.*?)(?=\{\{ else if|\Z)', body, re.S))
    return "".join(branches[m["role"]].replace("{{ .Content }}", m["content"]) for m in messages) + tail


def test_modelfile_template_renders_conversations_as_the_chat_template(tok):
    template = go_template(tok)
    assert template is not None
    conversation = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi?"},
                    {"role": "assistant", "content": "Hello.\nTwo lines."}, {"role": "user", "content": "Bye"}]
    for n in range(1, len(conversation) + 1):
        expected = tok.apply_chat_template(conversation[:n], tokenize=False, add_generation_prompt=True)
        assert _render_go(template, conversation[:n]) == expected
    text = modelfile("m.gguf", tok)
    assert text.startswith("FROM ./m.gguf\n") and f'TEMPLATE """{template}"""' in text
    assert 'PARAMETER stop "<|end|>"' in text and f'PARAMETER stop "{tok.eos_token}"' in text


def test_a_template_that_is_not_per_message_gets_no_go_translation(tok):
    folded = chat_tokenizer()  # Llama-2 style: the system prompt folded into the first user turn
    folded.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns = m['content'] %}"
        "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}</s>"
        "{% endif %}{% endfor %}")
    assert go_template(folded) is None
    assert "TEMPLATE" not in modelfile("m.gguf", folded).split("\n", 2)[1]
    plain = chat_tokenizer()
    plain.chat_template = None
    assert 'TEMPLATE """{{ .Prompt }}"""' in modelfile("m.gguf", plain)


# ------------------------------------------------------------------------------ the command


def test_command_writes_the_file_and_the_modelfile(tmp_path, tok, capsys):
    folder = _save(tmp_path / "model", _gpt(tok), tok)
    out = tmp_path / "m.gguf"
    assert main(["convert", str(folder), "--to-gguf", str(out), "--dtype", "q8_0"]) == 0
    printed = capsys.readouterr().out
    assert "GGUF llama, q8_0" in printed and f"ollama create NAME -f {out.with_suffix('.Modelfile')}" in printed
    assert _fields(out)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert _fields(out)["general.name"] == "model"  # the folder given
    assert out.with_suffix(".Modelfile").read_text().startswith("FROM ./m.gguf\n")
    before = out.read_bytes()
    assert main(["convert", str(folder), "--to-gguf", str(out), "--dtype", "f32", "--overwrite"]) == 0
    assert out.read_bytes() != before and _fields(out)["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.Modelfile", "m.gguf", "model"]  # no leftovers


def _refused(capsys, args: list[str], *needles: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("changes, needles", [
    (dict(position_embedding_type="alibi"), ("position_embedding_type='alibi'",)),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), ("rope_type='dynamic'", "GGUF")),
    (dict(norm_type="layernorm"), ("norm_type='layernorm'",)),
])
def test_switches_gguf_cannot_hold_are_refused_before_writing(tmp_path, tok, capsys, changes, needles):
    folder = _save(tmp_path / "model", _gpt(tok, **changes), tok)
    out = tmp_path / "out" / "m.gguf"
    _refused(capsys, ["convert", str(folder), "--to-gguf", str(out)], *needles)
    assert not (tmp_path / "out").exists()


def test_bad_inputs_are_refused_before_writing(tmp_path, tok, capsys):
    folder = _save(tmp_path / "model", _gpt(tok), tok)
    out = tmp_path / "m.gguf"
    out.write_text("keep me")
    _refused(capsys, ["convert", str(folder), "--to-gguf", str(out)], "already exists", "--overwrite")
    assert out.read_text() == "keep me"
    _refused(capsys, ["convert", str(folder), "--to-gguf", str(tmp_path)], "is a folder")
    _refused(capsys, ["convert", str(folder), "--to-gguf", str(tmp_path / "x.gguf"), "--dtype", "q5_k"],
             "q5_k", "q8_0")
    _refused(capsys, ["convert", str(folder), "--to-hf", str(tmp_path / "hf"), "--dtype", "q8_0"],
             "--dtype q8_0", "--to-gguf")
    _refused(capsys, ["convert", str(folder), "--to-gguf", str(folder / "inside.gguf")], "inside the model folder")

    classifier = LmforgeGPTForSequenceClassification(LmforgeGPTConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=2, **_ids(tok)))
    _refused(capsys, ["convert", str(_save(tmp_path / "cls", classifier, tok)), "--to-gguf", str(tmp_path / "c.gguf")],
             "LlamaForSequenceClassification", "--to-onnx")
    mamba = LmforgeMambaForCausalLM(LmforgeMambaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                                       state_size=4, use_bias=True))
    _refused(capsys, ["convert", str(_save(tmp_path / "mb", mamba, tok)), "--to-gguf", str(tmp_path / "b.gguf")],
             "use_bias=True")
    bare = tmp_path / "bare"
    _gpt(tok).save_pretrained(bare)
    _refused(capsys, ["convert", str(bare), "--to-gguf", str(tmp_path / "t.gguf")], "holds no tokenizer")
    _refused(capsys, ["convert", str(tmp_path / "missing"), "--to-gguf", str(tmp_path / "t.gguf")], "no such folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "cls", "m.gguf", "mb", "model"]


def test_an_adapter_folder_is_refused_with_the_merge_command(tmp_path, tok, capsys):
    from peft import LoraConfig, get_peft_model

    base = _save(tmp_path / "base", _gpt(tok), tok)
    peft_model = get_peft_model(LmforgeGPTForCausalLM.from_pretrained(base),
                                LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    _refused(capsys, ["convert", str(tmp_path / "adapter"), "--to-gguf", str(tmp_path / "a.gguf")],
             "LoRA adapter", "lmforge merge")
    assert not (tmp_path / "a.gguf").exists()


def test_a_failure_while_writing_leaves_nothing_behind(tmp_path, tok, monkeypatch):
    folder = _save(tmp_path / "model", _gpt(tok), tok)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(folder, tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_refusals_name_what_gguf_holds(tmp_path, tok):
    with pytest.raises(LmforgeError, match="f32, f16, bf16, q8_0, q4_0"):
        export_gguf(tmp_path, tmp_path / "m.gguf", dtype="int8")
