"""``lmforge push``: a model, adapter or tokenizer to the Hugging Face Hub."""

from __future__ import annotations

from lmforge.publish.hub import find_publishable, push_folder
from lmforge.runs import has_tokenizer


def push(model: str, repo_id: str, *, hub_private: bool = False, revision: str | None = None,
         commit_message: str | None = None, to_hf: bool = False, hub_base_model: str | None = None) -> int:
    """Push a model, LoRA adapter or tokenizer to the Hugging Face Hub (creates the repo if missing).

    MODEL is any folder lmforge wrote (a run, its final/, a quickstart folder), a saved model, a
    LoRA adapter or a tokenizer folder. Pushed: safetensors weights, config (with auto_map) and
    model code, tokenizer, generation config, adapter files and the model card (its "Load" section
    names the repo). The token comes from HF_TOKEN or the login cache (`hf auth login`) and is
    never printed or saved. Example: ``lmforge push runs/quickstart me/shakespeare-gpt``

    Args:
        model: the folder to push.
        repo_id: the Hub repo, USER/NAME or ORG/NAME.
        hub_private: create the repo as private (an existing repo keeps its visibility).
        revision: the branch to commit to (created from main if missing); default main.
        commit_message: the commit message.
        to_hf: convert to stock transformers classes first (Llama, GPT-2, BERT, Mamba), so the
            repo loads without trust_remote_code, in any tool that reads those formats.
        hub_base_model: for a LoRA adapter trained on a local base folder: the base model's Hub
            id, written into adapter_config.json and the card.
    """
    folder, kind = find_publishable(model)
    if kind == "model" and not has_tokenizer(folder):
        print(f"warning: {folder} holds no tokenizer; pushing the model without one (readers will need the "
              "tokenizer it was trained with)")
    result = push_folder(folder, repo_id, private=hub_private, revision=revision, commit_message=commit_message,
                         to_hf=to_hf, base_model=hub_base_model, kind=kind)
    print(f"pushed {result.kind} {folder} -> {result.url}\n  revision {result.revision}, commit {result.commit_id}, "
          f"{len(result.files)} files: {', '.join(result.files)}")
    return 0
