"""``lmforge serve MODEL``: an HTTP server speaking the OpenAI API (completions, chat)."""

from __future__ import annotations

import importlib.util
import os
import sys

from lmforge.commands.generate import Compile, Dtype, Weights, load_engine
from lmforge.errors import LmforgeError


def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    dtype: Dtype = "float32",
    weights: Weights = "float",
    compile: Compile = "auto",
    base_model: str | None = None,
    trust_remote_code: bool = False,
) -> int:
    """Serve a model over HTTP with the OpenAI API, for any OpenAI client (the openai package,
    curl, chat front-ends): GET /v1/models, POST /v1/completions, POST /v1/chat/completions, each
    with "stream": true as server-sent events. Requests are served one batch at a time, in order.
    Listens on 127.0.0.1 (this machine only) unless --host says otherwise; Ctrl-C stops it.
    Needs the serve extra: pip install 'lmforge[serve]'. Example:
    ``lmforge serve runs/chat-sft --port 8000``, then
    ``OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")``

    Args:
        model: the model folder (a run, a saved model, a LoRA adapter or a stock causal LM).
        host: the address to listen on (0.0.0.0: every network interface; pair it with --api-key).
        port: the TCP port.
        api_key: require "Authorization: Bearer KEY" on every request (default: the
            LMFORGE_API_KEY environment variable, else no key).
        dtype: float32 or bfloat16 weights and activations.
        weights: float, or int8 (weight-only quantised linear layers; lmforge GPT and Mamba).
        compile: compile the decode step with torch.compile (auto: yes where a C++ compiler is).
        base_model: an adapter's base model instead of the one its adapter_config.json records.
        trust_remote_code: allow a model that needs its own code (lmforge's load without it).
    """
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise LmforgeError(f"lmforge serve needs {' and '.join(missing)}: pip install 'lmforge[serve]'")
    if not 0 < port < 65536:
        raise LmforgeError(f"--port {port}: must be a TCP port, 1 to 65535")
    # fastapi is an extra: imported once it is known to be installed
    from lmforge.inference.server import serve as run_server

    engine = load_engine(model, dtype=dtype, weights=weights, compile=compile, base_model=base_model,
                         trust_remote_code=trust_remote_code, long_lived=True)
    if getattr(engine.decoder, "compile", False):
        print("warming up: compiling the decode step (other batch sizes and lengths compile on first use)",
              file=sys.stderr)
        engine.warm_up()
    run_server(engine, host=host, port=port, api_key=api_key or os.environ.get("LMFORGE_API_KEY") or None)
    return 0
