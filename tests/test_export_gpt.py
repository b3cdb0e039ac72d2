"""A saved GPT loads with trust_remote_code in an interpreter that cannot import lmforge."""

import json

import torch

from lmforge.models import LmforgeGPTConfig, LmforgeGPTForCausalLM
from tests.export_utils import run_isolated, tiny_tokenizer


def test_saved_gpt_loads_and_generates_without_lmforge(tmp_path):
    tok = tiny_tokenizer()
    config = LmforgeGPTConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LmforgeGPTForCausalLM(config).eval()
    out_dir = tmp_path / "gpt"
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)

    saved = json.loads((out_dir / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_gpt.LmforgeGPTForCausalLM"
    shared = ("switches.py", "norms.py", "positions.py", "attention.py", "feed_forward.py", "block.py", "dropout.py",
              "losses.py", "pooling.py", "initialization.py", "compat.py", "registration.py")  # imported siblings
    for name in ("model.safetensors", "modeling_gpt.py", "configuration_gpt.py", *shared, "generation_config.json"):
        assert (out_dir / name).is_file(), name
    gen_cfg = json.loads((out_dir / "generation_config.json").read_text())
    assert (gen_cfg["bos_token_id"], gen_cfg["eos_token_id"], gen_cfg["pad_token_id"]) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)

    ids = tok("To be, or not", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0].tolist()
        greedy = model.generate(ids, max_new_tokens=6, do_sample=False)[0].tolist()

    got = run_isolated(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, pipeline
        model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        ids = torch.tensor([{ids[0].tolist()}])
        with torch.no_grad():
            logits = model(ids).logits[0].tolist()
            greedy = model.generate(ids, max_new_tokens=6, do_sample=False)[0].tolist()
        gen = pipeline("text-generation", model=PATH, trust_remote_code=True)
        text = gen("To be", max_new_tokens=5, do_sample=False)[0]["generated_text"]
        emit({{"logits": logits, "greedy": greedy, "text": text, "tied": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()}})
        """,
        path=out_dir,
    )
    assert torch.allclose(torch.tensor(got["logits"]), torch.tensor(logits), atol=1e-6, rtol=0)
    assert got["greedy"] == greedy
    assert got["text"].startswith("To be") and len(got["text"]) > len("To be")
    assert got["tied"]
