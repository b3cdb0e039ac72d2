"""``lmforge convert``: a model to or from the stock transformers classes (Llama, GPT-2, BERT, Mamba),
or into the files runtimes load: GGUF (llama.cpp, Ollama) and ONNX (onnxruntime)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from lmforge.config import Option
from lmforge.errors import LmforgeError

_SHORT = ""  # --to-hf / --from-hf / --to-onnx given without a folder: the output comes from --output-dir
GgufType = Literal["f32", "f16", "bf16", "q8_0", "q4_0"]


def convert(model: str, *, to_hf: Annotated[str | None, Option(const=_SHORT)] = None,
            from_hf: Annotated[str | None, Option(const=_SHORT)] = None, to_gguf: Path | None = None,
            to_onnx: Annotated[str | None, Option(const=_SHORT)] = None, dtype: GgufType | None = None,
            output_dir: Path | None = None, overwrite: bool = False) -> int:
    """Convert a model to or from the stock transformers classes, or to GGUF or ONNX.

    --to-hf writes a checkpoint that loads with no remote code at all (trust_remote_code=False),
    so any tool that reads those formats can use it; --from-hf writes the lmforge model with its
    code. The weights are mapped exactly; a configuration the target cannot represent (e.g. an
    ALiBi GPT) is refused naming the switch. --to-gguf writes one GGUF file for llama.cpp and
    Ollama (GPT as llama or gpt2, Mamba, BERT encoders; the tokenizer and chat template inside;
    an Ollama Modelfile beside it); --to-onnx writes an ONNX model with its tokenizer for
    onnxruntime (BERT and GPT classifiers, encoders, GPT logits). The output folder is
    --output-dir, or the folder written right after --to-hf / --from-hf / --to-onnx. Examples:
    ``lmforge convert runs/quickstart --to-hf --output-dir stock``,
    ``lmforge convert path/to/llama --from-hf --output-dir runs/from-llama``,
    ``lmforge convert runs/quickstart --to-gguf quickstart.gguf --dtype q8_0``

    Args:
        model: --to-hf, --to-gguf, --to-onnx: any folder lmforge wrote (a run, its final/, a
            quickstart folder) or a saved lmforge model; --from-hf: a stock transformers model folder.
        to_hf: convert lmforge -> stock transformers (optionally followed by the output folder).
        from_hf: convert stock transformers -> lmforge (optionally followed by the output folder).
        to_gguf: the GGUF file to write (for llama.cpp and Ollama).
        to_onnx: export to ONNX (optionally followed by the output folder).
        dtype: the GGUF weight type: f32, f16, bf16, q8_0 or q4_0 (default f16; norms and vectors
            stay f32).
        output_dir: the folder to write the converted model to.
        overwrite: replace the model in a non-empty output folder (or an existing GGUF file).
    """
    chosen = {flag: value for flag, value in (("--to-hf", to_hf), ("--from-hf", from_hf), ("--to-gguf", to_gguf),
                                              ("--to-onnx", to_onnx)) if value is not None}
    if len(chosen) != 1:
        raise LmforgeError("give exactly one of --to-hf (lmforge -> stock transformers), --from-hf (stock "
                           "transformers -> lmforge), --to-gguf FILE (llama.cpp, Ollama) or --to-onnx (onnxruntime)"
                           + (f"; got {' and '.join(chosen)}" if chosen else ""))
    (flag, named), = chosen.items()
    if dtype is not None and flag != "--to-gguf":
        raise LmforgeError(f"--dtype {dtype} sets the weight type of a GGUF file; it applies to --to-gguf, not {flag}")
    if flag == "--to-gguf":
        if output_dir is not None:
            raise LmforgeError(f"--to-gguf names the file to write ({to_gguf}); --output-dir does not apply")
        return _to_gguf(model, to_gguf, dtype or "f16", overwrite)
    if named and output_dir is not None and Path(named) != Path(output_dir):
        raise LmforgeError(f"two output folders: {named} (after {flag}) and --output-dir {output_dir}; give one")
    output = Path(named) if named else output_dir
    if output is None:
        raise LmforgeError("where should the converted model go? give --output-dir DIR")
    flag = flag if named else "--output-dir"
    if to_onnx is not None:
        return _to_onnx(model, output, overwrite, flag)
    from lmforge.export.convert import convert as convert_model

    done = convert_model(model, output, to_hf=to_hf is not None, overwrite=overwrite, flag=flag)
    loads = ("loads without trust_remote_code" if done.to_hf
             else "carries its code: loads with trust_remote_code=True")
    print(f"{done.source_type} {done.source_class} -> {done.target_class}: {done.output} ({loads})")
    if not done.tokenizer:
        print(f"note: {done.source} holds no tokenizer; save one into {done.output}")
    return 0


def _to_gguf(model: str, output: Path, dtype: str, overwrite: bool) -> int:
    from lmforge.export.gguf_file import export_gguf

    done = export_gguf(model, output, dtype=dtype, overwrite=overwrite)
    types = ", ".join(f"{count} {name}" for name, count in sorted(done.tensor_types.items()))
    print(f"{done.source} -> {done.output}: GGUF {done.architecture}, {done.dtype} ({types} tensors), "
          f"{done.size / 2**20:.1f} MiB, tokenizer {done.tokenizer}")
    for note in done.notes:
        print(f"note: {note}")
    if done.modelfile is not None:
        print(f"Ollama: ollama create NAME -f {done.modelfile}    llama.cpp: llama-cli -m {done.output}")
    return 0


def _to_onnx(model: str, output: Path, overwrite: bool, flag: str) -> int:
    from lmforge.export.onnx import export_onnx

    done = export_onnx(model, output, overwrite=overwrite, flag=flag)
    print(f"{done.source} {done.model_class} -> {done.output / 'model.onnx'} (inputs {', '.join(done.inputs)}; "
          f"outputs {', '.join(done.outputs)})")
    if not done.tokenizer:
        print(f"note: {done.source} holds no tokenizer; save one into {done.output}")
    return 0
