"""The DPO paper's controlled-sentiment experiment on the built-in Rotten Tomatoes sentences
(issue 24's real case): does ``lmforge finetune --task preference`` make a small GPT write
positive reviews without forgetting how reviews read?

Stages (each skipped when its output exists; ``--force`` redoes the stages named):

1. ``tokenizer``: a byte-level BPE (``TOKENIZER_VOCAB`` tokens) trained on the train split.
   ``probe`` (not run by default): the candidate GPTs of ``PROBES`` (shape, document masks, a time
   or step budget) trained on the train sentences and scored by ``lmforge eval`` on the
   validation split; ``PRETRAIN`` is the one with the lowest validation perplexity. The train
   split is small (about 250k tokens), so wider models and longer runs overfit it rather than
   improve, and the chosen run is shorter than the 10-15 minute budget. Document masks lose under
   ``lmforge eval``, whose windows run across sentences, since a masked model never saw that.
2. ``pretrain``: the chosen GPT (``PRETRAIN``) on the 8,477 train sentences only, each sentence
   one document (EOS after it), for a fixed number of steps.
   Supervised tuning: there is none beyond this. The DPO paper's SFT step fine-tunes a general
   GPT-2 on movie reviews so that it writes reviews; this GPT's only training text *is* the
   review sentences, so the pretrained model already is that SFT model (the reference and the
   starting point of DPO). An SFT pass over the same sentences as prompt -> completion rows
   would be more epochs on the same tokens with the same loss (minus the prompt tokens), and
   more epochs already overfit this split (see ``probe``).
3. ``classifier``: the built-in all-MiniLM-L6-v2 fully fine-tuned on Rotten Tomatoes
   (``lmforge finetune --config rotten-tomatoes-full``, 4,000 train sentences, one epoch); its
   validation and test accuracy are recorded. It is the judge of every generation.
4. ``pairs``: the built-in ``rotten-tomatoes-pairs`` (``lmforge data fetch rotten-tomatoes-pairs``;
   ``lmforge.data.fetch.preference_pairs``): for each prefix length k of 1-4 words, the sentences
   of a split are grouped by their first k words; within a group the positive and the negative
   sentences are shuffled (seeded) and matched one to one: prompt = the shared prefix, chosen =
   the rest of the positive sentence, rejected = the rest of the negative one. DPO trains on the
   pairs of the TRAIN sentences and selects on those of the
   validation sentences (its eval split); the test pairs are not read. Measurement prompts: the first 2-4 words (drawn per
   sentence, seeded) of each held-out sentence with at least ``PAIR_MIN_REST_WORDS`` more words,
   duplicates dropped: ``prompts/validation.jsonl`` (for choosing settings); ``final`` writes
   ``prompts/test.jsonl`` and reads it once.
5. ``baseline``: the SFT model measured on the validation prompts and the validation split.
   A measurement samples ``SAMPLES`` completions per prompt (temperature 1, top-k 50, at most
   ``MAX_NEW_TOKENS`` new tokens, stopping at EOS; seeds fixed per prompt batch), classifies
   prompt + completion with the classifier and reports the positive share; the perplexity is
   ``lmforge eval MODEL --data rotten-tomatoes --split S --max-length BLOCK`` (windows of the
   pretraining rows for every model, so the DPO runs' own row length does not change it).
6. ``dpo``: ``lmforge finetune --task preference`` (full, reference ``auto``) over the grid
   ``--betas x --lrs x --epochs`` named on the command line (each run's ``final/`` is the step
   its own model selection picks on the validation pairs), each model measured like the
   baseline on validation. Chosen:
   the highest positive share among the models whose validation perplexity rises by less than
   ``--max-ppl-rise`` (a margin under the 10% aim, so that the test figure is not decided by
   noise).
   ``final``: the SFT model and the chosen one on the test prompts and the test split, written
   to ``benchmarks/results/dpo_sentiment.{json,md}``.

Every training and generation command uses one thread (``--threads``), so a second core stays
free. Run folders are under ``runs/dpo-sentiment/``; ``stages.json`` there holds each stage's
commands, wall-clock time and the machine's load.

    python benchmarks/dpo_sentiment.py                                 # every default stage
    python benchmarks/dpo_sentiment.py --stages tokenizer pretrain classifier pairs baseline
    python benchmarks/dpo_sentiment.py --stages dpo final --betas 0.1 0.3 1 --lrs 3e-5 1e-4 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import finish, machine_info, sample_load  # noqa: E402

from lmforge.data.fetch import PAIR_MIN_REST_WORDS, PAIR_PREFIX_WORDS, split_after_words  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS = Path("runs/dpo-sentiment")  # relative to ROOT, the working directory of the script and its commands
RESULTS = Path("benchmarks/results/dpo_sentiment")
LMFORGE = [sys.executable, "-m", "lmforge.cli"]

TOKENIZER_VOCAB = 4096
BLOCK = 128  # tokens per pretraining row; also the perplexity window of every model
# candidate GPTs: (name, hidden, layers, heads, feed-forward, document masks, budget: a time or a step count)
PROBES = [
    ("4x128-masks", 128, 4, 4, 384, True, {"minutes": 4}),
    ("4x128", 128, 4, 4, 384, False, {"minutes": 4}),
    ("4x192", 192, 4, 6, 512, False, {"minutes": 4}),
    ("6x192", 192, 6, 6, 512, False, {"minutes": 4}),
    ("4x192-650steps", 192, 4, 6, 512, False, {"steps": 650}),
]
PRETRAIN = {"shape": "4x128", "document_masks": False, "steps": 650}

PROMPT_WORDS = (2, 3, 4)
SAMPLES = 4
MAX_NEW_TOKENS = 30
TOP_K = 50
SEED = 0
STAGES = ["tokenizer", "probe", "pretrain", "classifier", "pairs", "baseline", "dpo", "final"]
DEFAULT_STAGES = [s for s in STAGES if s != "probe"]


# --------------------------------------------------------------------------- running commands


class Recorder:
    """Each stage's commands, wall-clock seconds and load, kept in ``runs/dpo-sentiment/stages.json``."""

    def __init__(self, threads: int):
        self.path = RUNS / "stages.json"
        self.threads = threads
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}

    def read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def run(self, stage: str, args: list[str]) -> float:
        """Run ``lmforge ARGS`` and note it under ``stage``; returns the seconds it took."""
        print("$ lmforge", " ".join(args), flush=True)
        start = time.perf_counter()
        subprocess.run([*LMFORGE, *args], cwd=ROOT, env=self.env, check=True)
        seconds = round(time.perf_counter() - start, 1)
        self.note(stage, commands=[{"command": "lmforge " + " ".join(args), "seconds": seconds}])
        return seconds

    def note(self, stage: str, *, commands: list[dict] | None = None, **fields) -> None:
        records = self.read()
        record = records.setdefault(stage, {"commands": []})
        record["commands"] += commands or []
        record.update(fields, date=time.strftime("%Y-%m-%d %H:%M:%S"), load_average=list(os.getloadavg()),
                      threads=self.threads)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(records, indent=1) + "\n")

    def reset(self, stage: str) -> None:
        records = self.read()
        records.pop(stage, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(records, indent=1) + "\n")


def _train_flags(threads: int) -> list[str]:
    return ["--train.num-threads", str(threads), "--no-train.progress"]


def perplexity(rec: Recorder, stage: str, model: Path, split: str, out: Path, *, redo: bool = False) -> dict:
    """``lmforge eval`` of a causal LM on a split of rotten-tomatoes, in windows of ``BLOCK`` tokens
    (cached in ``out`` unless ``redo``)."""
    if redo or not out.is_file():
        rec.run(stage, ["eval", str(model), "--data", "rotten-tomatoes", "--split", split,
                        "--max-length", str(BLOCK), "--no-progress", "--output-json", str(out)])
    result = json.loads(out.read_text())["models"][0]
    return {k: result[k] for k in ("loss", "perplexity", "bits_per_byte", "next_token_accuracy", "tokens")}


# --------------------------------------------------------------------------- data


def read_split(split: str) -> list[dict]:
    """The rows ({text, label, rating}) of a split of the built-in rotten-tomatoes corpus."""
    from lmforge.data.sources import load_table

    return list(load_table("rotten-tomatoes", split))


def pair_counts(split: str) -> dict:
    """How many pairs the built-in rotten-tomatoes-pairs has in a split, in all and by prefix length."""
    from lmforge.data.sources import load_table

    pairs = load_table("rotten-tomatoes-pairs", split)
    by_k = Counter(pairs["prefix_words"])
    return {"pairs": len(pairs), "by_prefix_words": {str(k): by_k[k] for k in sorted(by_k)}}


def measurement_prompts(rows: list[dict], seed: int) -> list[dict]:
    """The first 2-4 words (drawn per sentence) of each sentence long enough, duplicates dropped."""
    rng = random.Random(seed)
    seen, prompts = set(), []
    for row in rows:
        cut = split_after_words(row["text"], rng.choice(PROMPT_WORDS))
        if cut is not None and cut[0] not in seen:
            seen.add(cut[0])
            prompts.append({"prompt": cut[0], "label": int(row["label"])})
    return prompts


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- measuring a model


def sample_completions(model_dir: Path, prompts: list[str], *, threads: int, batch_prompts: int = 32) -> list[list[str]]:
    """``SAMPLES`` sampled completions of every prompt (temperature 1, top-k ``TOP_K``, at most
    ``MAX_NEW_TOKENS`` tokens, stopping at EOS). Prompts are batched by token length, so no
    padding is needed; each batch's seed is fixed by its position, so the same prompt file gives
    the same draws for a given model."""
    import torch

    from lmforge.runs import load_model

    torch.set_num_threads(threads)
    loaded = load_model(model_dir, auto_class="AutoModelForCausalLM")
    model, tok = loaded.model, loaded.tokenizer
    ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, x in enumerate(ids):
        by_length[len(x)].append(i)
    batches = [idx[j:j + batch_prompts] for _, idx in sorted(by_length.items()) for j in range(0, len(idx), batch_prompts)]
    out: list[list[str]] = [[] for _ in prompts]
    with torch.no_grad():
        for b, idx in enumerate(batches):
            torch.manual_seed(SEED * 1_000_003 + b)
            inputs = torch.tensor([ids[i] for i in idx])  # (B, T) prompts of one length
            generated = model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=True,
                                       temperature=1.0, top_k=TOP_K, top_p=1.0, max_new_tokens=MAX_NEW_TOKENS,
                                       num_return_sequences=SAMPLES, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id)  # (B * SAMPLES, T + new)
            new = generated[:, inputs.shape[1]:]
            for r, row in enumerate(new):
                stop = (row == tok.eos_token_id).nonzero()
                end = int(stop[0]) if len(stop) else len(row)
                out[idx[r // SAMPLES]].append(tok.decode(row[:end], skip_special_tokens=True))
    return out


def classify(classifier_dir: Path, texts: list[str], *, threads: int, batch_size: int = 64) -> list[float]:
    """The classifier's probability that each text is positive (label 1)."""
    import torch

    from lmforge.runs import load_model

    torch.set_num_threads(threads)
    loaded = load_model(classifier_dir, auto_class="AutoModelForSequenceClassification")
    model, tok = loaded.model, loaded.tokenizer
    label2id = {str(k): v for k, v in model.config.label2id.items()}
    positive = label2id["1"]
    probs: list[float] = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=64, return_tensors="pt")
            probs += model(**enc).logits.softmax(-1)[:, positive].tolist()
    return probs


def measure(model_dir: Path, prompts_file: Path, out: Path, *, threads: int, redo: bool = False) -> dict:
    """Positive share of the sampled completions of ``prompts_file`` (cached in ``out`` unless ``redo``)."""
    if out.is_file() and not redo:
        return json.loads(out.read_text())
    prompts = read_jsonl(prompts_file)
    start = time.perf_counter()
    completions = sample_completions(model_dir, [p["prompt"] for p in prompts], threads=threads)
    gen_seconds = time.perf_counter() - start
    texts = [p["prompt"] + c for p, cs in zip(prompts, completions, strict=True) for c in cs]
    probs = classify(RUNS / "classifier", texts, threads=threads)
    labels = [p["label"] for p in prompts for _ in range(SAMPLES)]
    positive = [q > 0.5 for q in probs]

    def share(keep: int | None) -> float:
        chosen = [y for y, lab in zip(positive, labels, strict=True) if keep is None or lab == keep]
        return sum(chosen) / len(chosen)

    result = {
        "model": str(model_dir), "prompts": len(prompts), "samples": len(texts),
        "positive_share": share(None), "mean_p_positive": sum(probs) / len(probs),
        "positive_share_by_prompt_source": {"positive sentences": share(1), "negative sentences": share(0)},
        "mean_completion_words": sum(len(c.split()) for cs in completions for c in cs) / len(texts),
        "distinct_completions": len({c for cs in completions for c in cs}) / len(texts),
        "generate_seconds": round(gen_seconds, 1), "seconds": round(time.perf_counter() - start, 1),
        "examples": [{"prompt": p["prompt"], "completion": cs[0], "p_positive": round(probs[i * SAMPLES], 3)}
                     for i, (p, cs) in enumerate(zip(prompts[:8], completions[:8], strict=True))],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    write_jsonl(out.with_suffix(".samples.jsonl"),
                [{"prompt": p["prompt"], "completion": c, "p_positive": round(probs[i * SAMPLES + j], 4)}
                 for i, (p, cs) in enumerate(zip(prompts, completions, strict=True)) for j, c in enumerate(cs)])
    return result


# --------------------------------------------------------------------------- stages


def _shape(name: str) -> str:
    """The ``--model.overrides`` of a candidate GPT of ``PROBES``."""
    _, h, n, heads, ff, *_ = next(p for p in PROBES if p[0] == name)
    return (f"{{hidden_size: {h}, num_hidden_layers: {n}, num_attention_heads: {heads}, num_key_value_heads: {heads}, "
            f"intermediate_size: {ff}, max_position_embeddings: 256, vocab_size: {TOKENIZER_VOCAB}}}")


def _pretrain_args(shape: str, masks: bool, out: Path, threads: int) -> list[str]:
    return ["pretrain", "--config", "quickstart", "--data", "rotten-tomatoes", "--data.tokenizer", str(RUNS / "tokenizer"),
            "--model.overrides", shape, "--data.block-size", str(BLOCK), "--train.micro-batch-size", "16",
            "--data.document-masks" if masks else "--no-data.document-masks", "--train.eval-every", "100",
            "--train.save-every", "500", *_train_flags(threads), "--output-dir", str(out), "--overwrite"]


def stage_tokenizer(rec: Recorder, args: argparse.Namespace) -> None:
    rec.run("tokenizer", ["tokenizer", "train", "--data", "rotten-tomatoes", "--split", "train",
                          "--vocab-size", str(TOKENIZER_VOCAB), "--no-progress",
                          "--output-dir", str(RUNS / "tokenizer"), "--overwrite"])


def stage_probe(rec: Recorder, args: argparse.Namespace) -> None:
    results = {}
    for name, *_, masks, budget in PROBES:
        out = RUNS / "probes" / name
        if args.force or not (out / "final").is_dir():
            limit = (["--train.max-minutes", str(budget["minutes"])] if "minutes" in budget else
                     ["--train.max-steps", str(budget["steps"]), "--train.max-minutes", "null"])
            rec.run("probe", [*_pretrain_args(_shape(name), masks, out, args.threads), *limit])
        last = [m for m in _metrics(out) if "elapsed_s" in m][-1]
        results[name] = {"document_masks": masks, "budget": budget, "steps": last["step"],
                         "train_seconds": round(last["elapsed_s"], 1),
                         "run_eval_perplexity": [m for m in _metrics(out) if "eval_perplexity" in m][-1]["eval_perplexity"],
                         "validation": perplexity(rec, "probe", out, "validation", out / "eval_validation.json",
                                                     redo=args.force)}
        print(name, json.dumps(results[name]), flush=True)
    rec.note("probe", results=results)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def stage_pretrain(rec: Recorder, args: argparse.Namespace) -> None:
    out = RUNS / "gpt"
    rec.run("pretrain", [*_pretrain_args(_shape(PRETRAIN["shape"]), PRETRAIN["document_masks"], out, args.threads),
                         "--train.max-steps", str(PRETRAIN["steps"]), "--train.max-minutes", "null"])
    evals = [m for m in _metrics(out) if "eval_loss" in m]
    rec.note("pretrain", settings=PRETRAIN, eval_curve=[{"step": m["step"], "eval_loss": m["eval_loss"]} for m in evals])


def stage_classifier(rec: Recorder, args: argparse.Namespace) -> None:
    out = RUNS / "classifier"
    rec.run("classifier", ["finetune", "--config", "rotten-tomatoes-full", "--model.path", "all-minilm-l6-v2",
                           *_train_flags(args.threads), "--output-dir", str(out), "--overwrite"])
    rec.note("classifier", results=json.loads((out / "eval_results.json").read_text()))


def stage_pairs(rec: Recorder, args: argparse.Namespace) -> None:
    rec.run("pairs", ["data", "fetch", "rotten-tomatoes-pairs"])
    counts = {split: pair_counts(split) for split in ("train", "validation")}
    counts["validation_prompts"] = write_prompts("validation")
    print(json.dumps(counts, indent=1), flush=True)
    rec.note("pairs", counts=counts)


def write_prompts(split: str) -> dict:
    """Write the measurement prompts of a split (the test ones only in ``final``); their counts."""
    prompts = measurement_prompts(read_split(split), SEED)
    write_jsonl(RUNS / "prompts" / f"{split}.jsonl", prompts)
    return {"prompts": len(prompts), "from_positive": sum(p["label"] for p in prompts)}


def stage_baseline(rec: Recorder, args: argparse.Namespace) -> None:
    model = RUNS / "gpt"
    result = measure(model, RUNS / "prompts" / "validation.jsonl", RUNS / "measure" / "sft-validation.json",
                     threads=args.threads, redo=args.force)
    ppl = perplexity(rec, "baseline", model, "validation", RUNS / "measure" / "sft-validation-ppl.json",
                     redo=args.force)
    print(json.dumps({"positive_share": result["positive_share"], "perplexity": ppl["perplexity"]}), flush=True)
    rec.note("baseline", positive_share=result["positive_share"], perplexity=ppl["perplexity"],
             measure_seconds=result["seconds"])


def _grid(args: argparse.Namespace) -> list[dict]:
    return [{"method": args.dpo_method, "beta": b, "lr": lr, "epochs": e}
            for b in args.betas for lr in args.lrs for e in args.epochs]


def _run_name(point: dict) -> str:
    method = "" if point["method"] == "full" else f"{point['method']}-"
    return f"{method}beta{point['beta']:g}-lr{point['lr']:g}-ep{point['epochs']:g}"


def stage_dpo(rec: Recorder, args: argparse.Namespace) -> None:
    before = json.loads((RUNS / "measure" / "sft-validation.json").read_text())
    ppl_before = perplexity(rec, "dpo", RUNS / "gpt", "validation", RUNS / "measure" / "sft-validation-ppl.json")
    rows = []
    for point in _grid(args):
        name = _run_name(point)
        out = RUNS / "dpo" / name
        if args.force or not (out / "final").is_dir():
            rec.run("dpo", ["finetune", "--task", "preference", "--model.path", str(RUNS / "gpt"),
                            "--data", "rotten-tomatoes-pairs", "--data.test-split", "null",  # test: in final only
                            "--method", point["method"], "--preference.loss", "dpo",
                            "--preference.beta", str(point["beta"]), "--preference.reference", "auto",
                            "--data.max-length", str(BLOCK), "--optim.lr", str(point["lr"]),
                            "--train.epochs", str(point["epochs"]), "--train.micro-batch-size", str(args.dpo_batch),
                            "--train.eval-every", "50", *_train_flags(args.threads),
                            "--output-dir", str(out), "--overwrite"])
        result = measure(out / "final", RUNS / "prompts" / "validation.jsonl", RUNS / "measure" / f"{name}-validation.json",
                         threads=args.threads, redo=args.force)
        ppl = perplexity(rec, "dpo", out / "final", "validation", RUNS / "measure" / f"{name}-validation-ppl.json",
                         redo=args.force)
        row = {**point, "run": name, "positive_share": result["positive_share"], "perplexity": ppl["perplexity"],
               "positive_share_rise_points": 100 * (result["positive_share"] - before["positive_share"]),
               "perplexity_rise": ppl["perplexity"] / ppl_before["perplexity"] - 1,
               "dpo_eval": _read_json(out / "eval_results.json")}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "dpo_eval"}), flush=True)
    allowed = [r for r in rows if r["perplexity_rise"] < args.max_ppl_rise]
    chosen = max(allowed, key=lambda r: r["positive_share"]) if allowed else None
    rec.note("dpo", grid=rows, chosen=chosen and chosen["run"], max_ppl_rise=args.max_ppl_rise,
             sft_validation={"positive_share": before["positive_share"], "perplexity": ppl_before["perplexity"]})
    print("chosen:", chosen and chosen["run"] or "none under the perplexity limit", flush=True)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def stage_final(rec: Recorder, args: argparse.Namespace) -> None:
    stages = rec.read()
    chosen = stages.get("dpo", {}).get("chosen")
    if not chosen:
        raise SystemExit("final: no DPO model was chosen (run --stages dpo first; see stages.json)")
    test_prompts = write_prompts("test")
    measured = {}
    for name, model in (("sft", RUNS / "gpt"), ("dpo", RUNS / "dpo" / chosen / "final")):
        measured[name] = {
            "generation": measure(model, RUNS / "prompts" / "test.jsonl", RUNS / "measure" / f"{name}-test.json",
                                  threads=args.threads, redo=args.force),
            "perplexity": perplexity(rec, "final", model, "test", RUNS / "measure" / f"{name}-test-ppl.json",
                                     redo=args.force),
        }
    sft, dpo = measured["sft"], measured["dpo"]
    rise = 100 * (dpo["generation"]["positive_share"] - sft["generation"]["positive_share"])
    ppl_rise = dpo["perplexity"]["perplexity"] / sft["perplexity"]["perplexity"] - 1
    grid = stages["dpo"]["grid"]
    record = {
        "command": "python benchmarks/dpo_sentiment.py " + " ".join(sys.argv[1:]),
        "machine": args.machine,
        "settings": {
            "tokenizer": {"algorithm": "bpe", "vocab_size": TOKENIZER_VOCAB, "trained_on": "rotten-tomatoes train"},
            "pretrain": {**PRETRAIN, "model_overrides": _shape(PRETRAIN["shape"]), "block_size": BLOCK,
                         "data": "rotten-tomatoes train sentences only"},
            "sft": "the pretrained model (its training text is the review sentences; see the script's docstring)",
            "classifier": "all-minilm-l6-v2, lmforge finetune --config rotten-tomatoes-full",
            "pairs": {"source": "rotten-tomatoes-pairs (built-in)", "prefix_words": list(PAIR_PREFIX_WORDS),
                      "min_rest_words": PAIR_MIN_REST_WORDS},
            "prompts": {"words": list(PROMPT_WORDS), "min_rest_words": PAIR_MIN_REST_WORDS, "deduplicated": True},
            "generation": {"samples_per_prompt": SAMPLES, "max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0,
                           "top_k": TOP_K, "seed": SEED},
            "perplexity": f"lmforge eval --max-length {BLOCK} (disjoint windows of the pretraining row length)",
            "dpo_grid": {"betas": sorted({r["beta"] for r in grid}), "lrs": sorted({r["lr"] for r in grid}),
                         "epochs": sorted({r["epochs"] for r in grid}), "micro_batch_size": args.dpo_batch,
                         "selection": f"highest validation positive share with validation perplexity rise < "
                                      f"{stages['dpo']['max_ppl_rise']:.0%}"},
        },
        "probes": stages.get("probe", {}).get("results"),
        "pretrain_eval_curve": stages.get("pretrain", {}).get("eval_curve"),
        "classifier": stages.get("classifier", {}).get("results"),
        "pairs": {**stages.get("pairs", {}).get("counts", {}), "test_prompts": test_prompts},
        "validation": {"sft": stages["dpo"]["sft_validation"], "grid": grid, "chosen": chosen},
        "test": {"sft": sft, "dpo": dpo, "positive_share_rise_points": rise, "perplexity_rise": ppl_rise},
        "aim": {"positive_share_rise_points_at_least": 25, "perplexity_rise_below": 0.10,
                "met": rise >= 25 and ppl_rise < 0.10},
        "stages": {k: {"seconds": sum(c["seconds"] for c in v.get("commands", [])), "commands": v.get("commands")}
                   for k, v in stages.items()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps(finish_record(record), indent=1, ensure_ascii=False) + "\n")
    RESULTS.with_suffix(".md").write_text(_table(record))
    print(_table(record), flush=True)


def finish_record(record: dict) -> dict:
    finish(record["machine"])
    return record


def _table(r: dict) -> str:
    t, v = r["test"], r["validation"]
    lines = [
        "# DPO controlled sentiment on Rotten Tomatoes (benchmarks/dpo_sentiment.py)", "",
        f"Test prompts: {t['sft']['generation']['prompts']} (first 2-4 words of test sentences), "
        f"{SAMPLES} samples each; perplexity on the test split ({t['sft']['perplexity']['tokens']:,} tokens).", "",
        "| model | positive share (test) | test perplexity |",
        "|---|---:|---:|",
        f"| SFT (pretrained GPT) | {t['sft']['generation']['positive_share']:.1%} | {t['sft']['perplexity']['perplexity']:.2f} |",
        f"| DPO ({v['chosen']}) | {t['dpo']['generation']['positive_share']:.1%} | {t['dpo']['perplexity']['perplexity']:.2f} |",
        f"| change | {t['positive_share_rise_points']:+.1f} points | {t['perplexity_rise']:+.1%} |", "",
        f"Judge: all-MiniLM-L6-v2 fine-tuned by `lmforge finetune --config rotten-tomatoes-full`, accuracy "
        f"{r['classifier']['eval']['accuracy']:.3f} (validation), {r['classifier']['test']['accuracy']:.3f} (test). "
        f"Preference pairs: {r['pairs']['train']['pairs']:,} from train sentences, "
        f"{r['pairs']['validation']['pairs']:,} from validation sentences.", "",
        f"Aim (>= +25 points, perplexity < +10%): {'met' if r['aim']['met'] else 'not met'}.", "",
        "Validation grid (settings chosen here):", "",
        "| run | positive share | perplexity | rise (points) | perplexity rise |", "|---|---:|---:|---:|---:|",
        f"| SFT | {v['sft']['positive_share']:.1%} | {v['sft']['perplexity']:.2f} | | |",
    ]
    lines += [f"| {g['run']} | {g['positive_share']:.1%} | {g['perplexity']:.2f} | {g['positive_share_rise_points']:+.1f} "
              f"| {g['perplexity_rise']:+.1%} |" for g in v["grid"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


DONE = {  # a stage is skipped when this exists
    "tokenizer": lambda: RUNS / "tokenizer" / "tokenizer.json",
    "probe": lambda: RUNS / "probes" / PROBES[-1][0] / "eval_validation.json",
    "pretrain": lambda: RUNS / "gpt" / "final" / "config.json",
    "classifier": lambda: RUNS / "classifier" / "eval_results.json",
    "pairs": lambda: RUNS / "prompts" / "validation.jsonl",
    "baseline": lambda: RUNS / "measure" / "sft-validation-ppl.json",
    "dpo": None,  # every grid point is skipped on its own when done
    "final": None,
}
RUNNERS = {"tokenizer": stage_tokenizer, "probe": stage_probe, "pretrain": stage_pretrain,
           "classifier": stage_classifier, "pairs": stage_pairs, "baseline": stage_baseline,
           "dpo": stage_dpo, "final": stage_final}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=DEFAULT_STAGES)
    parser.add_argument("--force", action="store_true", help="redo the stages named even when their output exists")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every command and measurement")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 1e-4])
    parser.add_argument("--epochs", type=int, nargs="+", default=[1])
    parser.add_argument("--dpo-batch", type=int, default=16, help="pairs per DPO micro-batch")
    parser.add_argument("--dpo-method", choices=["full", "lora"], default="full", help="DPO updates every weight or a LoRA adapter")
    parser.add_argument("--max-ppl-rise", type=float, default=0.08,
                        help="choose among DPO models whose validation perplexity rises less than this")
    args = parser.parse_args()
    os.chdir(ROOT)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    args.machine = machine_info()
    rec = Recorder(args.threads)
    for stage in [s for s in STAGES if s in args.stages]:
        done = DONE[stage]
        if done is not None and done().exists() and not args.force:
            print(f"[{stage}] done ({done()} exists; --force redoes it)", flush=True)
            continue
        if args.force:
            rec.reset(stage)
        print(f"[{stage}]", flush=True)
        RUNNERS[stage](rec, args)
        sample_load(args.machine)


if __name__ == "__main__":
    main()
