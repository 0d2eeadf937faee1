"""An Ollama ``Modelfile`` beside the GGUF: FROM, TEMPLATE (Go template syntax), stop tokens, sampling defaults.

Ollama templates are Go templates, not Jinja, so the chat template cannot be translated in general: known families
(ChatML, Gemma, Llama 3, Mistral [INST]) are recognised by their turn markers and get their standard Go template;
anything else gets no TEMPLATE line and a comment saying so (Ollama then falls back on the template stored in the
GGUF).
"""

from __future__ import annotations

import os
from typing import Any

_FAMILIES = {
    "chatml": (
        "<|im_start|>",
        ["<|im_end|>"],
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
    ),
    # Gemma has no system role: its template folds a system message into a user turn, as here.
    "gemma": (
        "<start_of_turn>",
        ["<end_of_turn>"],
        '{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}user{{ end }}'
        "\n{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
    ),
    "llama3": (
        "<|start_header_id|>",
        ["<|eot_id|>"],
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "mistral": (
        "[INST]",
        ["[INST]", "[/INST]"],
        '{{- range .Messages }}{{ if eq .Role "assistant" }}{{ .Content }}</s>'
        "{{ else }}[INST] {{ .Content }} [/INST]{{ end }}{{ end }}",
    ),
}


def template_family(chat_template: str | None) -> str | None:
    if not chat_template:
        return None
    return next((name for name, (marker, _, _) in _FAMILIES.items() if marker in chat_template), None)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(
    gguf_file: str, chat_template: str | None, eos_token: str | None, generation: dict[str, Any] | None = None
) -> str:
    """The Modelfile for ``gguf_file`` (a path relative to the Modelfile's directory)."""
    lines = [f"FROM ./{os.path.basename(gguf_file)}", ""]
    family = template_family(chat_template)
    stops: list[str] = []
    if family is None:
        lines.append(
            "# no TEMPLATE: the chat template is not a known family (chatml, gemma, llama3, mistral); Ollama uses "
            "the one stored in the GGUF if it recognises it"
        )
    else:
        _, stops, template = _FAMILIES[family]
        lines.append(f"# TEMPLATE: the {family} chat format")
        lines.append(f'TEMPLATE """{template}"""')
    if eos_token and eos_token not in stops:
        stops = [*stops, eos_token]
    lines += [f"PARAMETER stop {_quote(s)}" for s in stops]
    for key in ("temperature", "top_p", "top_k"):
        if generation and generation.get(key) is not None:
            lines.append(f"PARAMETER {key} {generation[key]}")
    return "\n".join(lines) + "\n"
