"""An Ollama Modelfile beside an exported GGUF: `ollama create NAME -f Modelfile` serves the model.

Ollama does not run the model's Jinja chat template: it needs the same format as a Go template over
`.Messages`, plus stop strings. We recognise the format by rendering the model's own chat template on a
probe conversation and comparing it with each known format's rendering:

- ChatML (SmolLM2, Qwen2/2.5/3): `<|im_start|>{role}\\n{content}<|im_end|>\\n`, then `<|im_start|>assistant\\n`;
- Llama 3: `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`, then the assistant header
  (BOS is not in the template: llama.cpp adds it, the GGUF says so).

A template that injects a default system message when there is none (SmolLM2's does) gets it as the
Modelfile's SYSTEM, which Ollama puts first when a conversation has no system message. A template that
matches no known format exactly (Qwen3's reasoning blocks, Llama 3.1's date header) is approximated by the
nearest one, and the Modelfile says so in a comment; one that resembles none gets no TEMPLATE at all.
Messages are inserted as they are (Llama 3's own template also trims whitespace around each one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ExportError

MODELFILE_NAME = "Modelfile"


@dataclass(frozen=True)
class ChatFormat:
    name: str
    marker: str  # a string only this format's renderings contain
    go_template: str  # Ollama's TEMPLATE
    render: Callable[[list[dict]], str]  # what go_template produces, with the generation prompt
    system_prefix: str  # how a system turn starts and ends: to find a default system message
    system_suffix: str
    stops: tuple[str, ...]


def _render_chatml(messages: list[dict]) -> str:
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def _render_llama3(messages: list[dict]) -> str:
    turns = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages)
    return turns + "<|start_header_id|>assistant<|end_header_id|>\n\n"


CHATML = ChatFormat(
    name="ChatML",
    marker="<|im_start|>",
    go_template=(
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    ),
    render=_render_chatml,
    system_prefix="<|im_start|>system\n",
    system_suffix="<|im_end|>\n",
    stops=("<|im_end|>", "<|im_start|>"),
)
LLAMA3 = ChatFormat(
    name="Llama 3",
    marker="<|start_header_id|>",
    go_template=(
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    render=_render_llama3,
    system_prefix="<|start_header_id|>system<|end_header_id|>\n\n",
    system_suffix="<|eot_id|>",
    stops=("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
)
FORMATS = (CHATML, LLAMA3)

# Plain contents (no surrounding whitespace, no markup) so that only the format is compared.
_PROBE = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there."},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2 + 2?"},
]


@dataclass(frozen=True)
class RecognisedTemplate:
    format: ChatFormat | None
    exact: bool
    default_system: str | None


def recognise_chat_template(tokenizer) -> RecognisedTemplate:
    """Which known format the tokenizer's chat template produces, whether exactly, and its default system
    message (the one it adds when a conversation has none)."""
    if not getattr(tokenizer, "chat_template", None):
        return RecognisedTemplate(None, False, None)
    rendered = _strip_bos(tokenizer, _apply(tokenizer, _PROBE))
    for fmt in FORMATS:
        if fmt.marker not in rendered:
            continue
        without_system = _strip_bos(tokenizer, _apply(tokenizer, _PROBE[1:]))
        default_system = None
        if without_system.startswith(fmt.system_prefix):
            end = without_system.find(fmt.system_suffix, len(fmt.system_prefix))
            if end > 0:
                default_system = without_system[len(fmt.system_prefix):end]
        exact = rendered == fmt.render(_PROBE) and without_system == fmt.render(
            ([{"role": "system", "content": default_system}] if default_system is not None else []) + _PROBE[1:]
        )
        return RecognisedTemplate(fmt, exact, default_system)
    return RecognisedTemplate(None, False, None)


def modelfile_text(tokenizer, gguf_file_name: str) -> str:
    """The Modelfile for a GGUF named `gguf_file_name` in the same directory."""
    recognised = recognise_chat_template(tokenizer)
    lines = [
        "# Ollama Modelfile written by lorafit. In this directory: ollama create NAME -f Modelfile",
        f"FROM ./{gguf_file_name}",
    ]
    fmt = recognised.format
    if fmt is None:
        lines.append("# The model has no chat template that lorafit recognises (ChatML, Llama 3): no TEMPLATE, so "
                     "Ollama passes prompts through as they are.")
    else:
        if not recognised.exact:
            lines.append(f"# NOTE: the model's chat template was approximated by the {fmt.name} format below; "
                         f"check it against the template in the tokenizer before relying on it.")
        lines.append(f'TEMPLATE """{_quoted(fmt.go_template)}"""')
        if recognised.default_system is not None:
            lines.append(f'SYSTEM """{_quoted(recognised.default_system)}"""')
    stops = list(fmt.stops) if fmt else []
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(tokenizer, gguf_path) -> Path:
    """Writes `Modelfile` in the GGUF's directory and returns its path."""
    gguf_path = Path(gguf_path)
    path = gguf_path.parent / MODELFILE_NAME
    path.write_text(modelfile_text(tokenizer, gguf_path.name))
    return path


def _apply(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _strip_bos(tokenizer, text: str) -> str:
    """A template that writes BOS itself (Llama 3's <|begin_of_text|>) while encoding adds it too: llama.cpp
    adds it from the GGUF's add_bos_token, so Ollama's template must not. (SmolLM2's BOS, <|im_start|>, is
    not added by encoding and stays.)"""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    encoding_adds_bos = bos_id is not None and tokenizer("a").input_ids[:1] == [bos_id]
    return text[len(bos):] if encoding_adds_bos and text.startswith(bos) else text


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ExportError('a chat template or system message contains """, which a Modelfile cannot quote')
    return text
