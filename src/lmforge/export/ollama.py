"""An Ollama ``Modelfile`` for a GGUF file: ``ollama create NAME -f MODEL.Modelfile``.

Ollama's templates are Go templates, not the Jinja chat templates transformers uses. A chat template
that renders each message as ``prefix(role) + content + suffix(role)`` and ends with a fixed
generation prompt (lmforge's own, ChatML, Llama-2-free templates of that shape) is translated by
rendering it: the prefix and suffix of each role are read off the Jinja output around a marker, and
the translation is accepted only when it reproduces the Jinja rendering of a mixed conversation
exactly. A template of another shape gets no TEMPLATE line (Ollama then uses the file's own
``tokenizer.chat_template`` when it recognises it) and a note saying so. A model without a chat
template gets the plain completion template ``{{ .Prompt }}``.
"""

from __future__ import annotations

from typing import Any

from lmforge.data.chat import end_of_turn_ids

ROLES = ("system", "user", "assistant")
_MARK = "\x00lmforge-content\x00"
_PROBE = [  # a mixed conversation the translation must reproduce exactly
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Two\nlines"},
]


def modelfile(gguf_name: str, tokenizer: Any) -> str:
    """The Modelfile text for ``gguf_name`` (a file in the same folder) and its tokenizer."""
    lines = [f"FROM ./{gguf_name}"]
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        lines.append('TEMPLATE """{{ .Prompt }}"""')
        stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    else:
        go = go_template(tokenizer)
        if go is None:
            lines.append("# This chat template has no exact Go translation: Ollama uses the GGUF file's own\n"
                         "# tokenizer.chat_template when it recognises it; otherwise write a TEMPLATE here.")
        else:
            lines.append(f'TEMPLATE """{go}"""')
        stops = [tokenizer.convert_ids_to_tokens(i) for i in end_of_turn_ids(tokenizer)]
    lines += [f'PARAMETER stop "{_quote(stop)}"' for stop in dict.fromkeys(stops) if stop]
    return "\n".join(lines) + "\n"


def go_template(tokenizer: Any) -> str | None:
    """The chat template as an Ollama Go template over ``.Messages``, or None when it is not of the
    per-message shape (see the module docstring)."""
    try:
        parts = {role: _around(tokenizer, [{"role": role, "content": _MARK}]) for role in ROLES}
        ask = _render(tokenizer, _PROBE[:1], True)[len(_render(tokenizer, _PROBE[:1], False)):]
        expected = _render(tokenizer, _PROBE, True)
    except Exception:  # a template that refuses a lone system/assistant turn is not per-message
        return None
    if any(part is None for part in parts.values()):
        return None
    pieces = [*(piece for part in parts.values() for piece in part), ask]
    if any("{{" in piece or '"""' in piece for piece in pieces):  # Go actions, the Modelfile's own quotes
        return None
    rebuilt = "".join(parts[m["role"]][0] + m["content"] + parts[m["role"]][1] for m in _PROBE) + ask
    if rebuilt != expected:
        return None
    branches = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{parts[role][0]}'
                       f"{{{{ .Content }}}}{parts[role][1]}" for i, role in enumerate(ROLES))
    return f"{{{{- range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{ask}"


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _around(tokenizer: Any, messages: list[dict]) -> tuple[str, str] | None:
    text = _render(tokenizer, messages, False)
    if text.count(_MARK) != 1:
        return None
    prefix, suffix = text.split(_MARK)
    return prefix, suffix


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
