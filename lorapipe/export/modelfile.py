"""The Ollama Modelfile beside a merged model: `FROM .`, a Go-template TEMPLATE translated from the tokenizer's Jinja
chat template, and a `PARAMETER stop` line for every end token.

Two families are translated, recognised by their tokens in the Jinja text: ChatML
(`<|im_start|>role\\n...<|im_end|>\\n`: Qwen, the tiny model, many fine-tunes) and Llama 3
(`<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>`). The family only says what a turn looks like; the
rest (text before the first turn, a system preamble such as Llama 3.1's knowledge-cutoff lines, a default system
prompt such as Qwen's) is read off the template by rendering probe conversations with `apply_chat_template`, and
the translation is written only when those renderings match the family's layout exactly. Anything else gets a
Modelfile without TEMPLATE and a comment that says why: a missing template is visible, a wrong one silently degrades
every answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

MODELFILE = "Modelfile"
# plain words: they survive a template's `| trim` and cannot collide with any special token
_PROBE = {"system": "lorapipe probe system", "user": "lorapipe probe user", "assistant": "lorapipe probe assistant",
          "user2": "lorapipe probe user again"}


@dataclass(frozen=True)
class ChatFamily:
    name: str
    markers: tuple[str, ...]  # all of them in the Jinja text: this family
    header: str  # a turn's opening, `{role}` filled in
    end: str  # a turn's closing

    def turn(self, role: str, content: str) -> str:
        return self.header.format(role=role) + content + self.end


CHATML = ChatFamily("ChatML", ("<|im_start|>", "<|im_end|>"), "<|im_start|>{role}\n", "<|im_end|>\n")
LLAMA3 = ChatFamily("Llama 3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                    "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>")
FAMILIES = (CHATML, LLAMA3)


class NotTranslated(ValueError):
    """The chat template cannot be written as an Ollama TEMPLATE with confidence; the message says why."""


@dataclass(frozen=True)
class ChatLayout:
    """A family's turns plus what the probes found around them."""

    family: ChatFamily
    prefix: str  # before the first turn: the BOS token, which the runtime adds itself when it tokenizes
    system_preamble: str  # written before the system message's content inside its turn
    default_system: Optional[str]  # the system turn's content when the conversation has none; None: no system turn


@dataclass(frozen=True)
class OllamaModelfile:
    text: str
    family: Optional[str]  # the translated family, None when no TEMPLATE was written
    template: Optional[str]  # the Go template, as written after TEMPLATE
    note: str  # why there is no TEMPLATE, or what the translation leaves out


def detect_family(chat_template: str) -> Optional[ChatFamily]:
    for family in FAMILIES:
        if all(marker in chat_template for marker in family.markers):
            return family
    return None


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    from lorapipe.data.render import render  # the template's switches, as training rendered with them

    return render(tokenizer, messages, None, add_generation_prompt=True)


def read_layout(tokenizer: Any, family: ChatFamily) -> ChatLayout:
    """Render two probe conversations and read the layout off them, or raise NotTranslated naming the mismatch."""
    template = tokenizer.chat_template or ""
    if "strftime_now" in template:
        raise NotTranslated("the template writes today's date (strftime_now); a fixed TEMPLATE would freeze it")
    p = _PROBE
    try:
        full = _render(tokenizer, [{"role": "system", "content": p["system"]}, {"role": "user", "content": p["user"]},
                                   {"role": "assistant", "content": p["assistant"]},
                                   {"role": "user", "content": p["user2"]}])
        bare = _render(tokenizer, [{"role": "user", "content": p["user"]}])
    except Exception as exc:
        raise NotTranslated(f"the template cannot render a plain system/user/assistant conversation ({exc})") from exc
    bos = tokenizer.bos_token or ""
    prefix = bos if bos and full.startswith(bos) else ""
    system_head = family.header.format(role="system")
    body = full[len(prefix):]
    if not body.startswith(system_head) or p["system"] not in body:
        raise NotTranslated(f"a system message does not open with {system_head!r}: {full[:120]!r}")
    after_head = body[len(system_head):]
    preamble = after_head[:after_head.index(p["system"])]
    generation = family.header.format(role="assistant")
    conversation = (p["system"] + family.end + family.turn("user", p["user"]) +
                    family.turn("assistant", p["assistant"]) + family.turn("user", p["user2"]) + generation)
    if after_head[len(preamble):] != conversation or any(m in preamble for m in family.markers):
        raise NotTranslated(f"the {family.name} turns do not render as expected: {full!r}")
    if not bare.startswith(prefix):
        raise NotTranslated(f"the conversation without a system message starts differently: {bare[:120]!r}")
    bare_body, rest = bare[len(prefix):], family.turn("user", p["user"]) + generation
    if bare_body == rest:
        default = None
    elif bare_body.startswith(system_head) and bare_body.endswith(family.end + rest):
        default = bare_body[len(system_head):-len(family.end + rest)]
        if any(m in default for m in family.markers):
            raise NotTranslated(f"the default system turn is not one plain turn: {bare!r}")
    else:
        raise NotTranslated(f"the conversation without a system message does not render as expected: {bare!r}")
    return ChatLayout(family, prefix, preamble, default)


def go_template(layout: ChatLayout) -> str:
    """Ollama's template over .Messages (system messages included, as Ollama passes them) with $last, as in Ollama's
    own library templates: the assistant header follows the last message unless it is the assistant's own (then its
    turn stays open, a prefill). One line: Go's whitespace trimming would eat the turns' own newlines."""
    f = layout.family
    head = f.header.format(role="{{ .Role }}")
    parts = []
    if layout.default_system is not None:  # what the template writes when the conversation has no system message
        parts.append("{{ if not .System }}" + f.turn("system", layout.default_system) + "{{ end }}")
    parts.append("{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}")
    if layout.system_preamble:
        parts.append('{{ if eq .Role "system" }}' + f.header.format(role="system") + layout.system_preamble
                     + "{{ .Content }}" + f.end + "{{ else }}")
    parts.append(head + '{{ .Content }}{{ if not (and $last (eq .Role "assistant")) }}' + f.end + "{{ end }}")
    if layout.system_preamble:
        parts.append("{{ end }}")
    parts.append('{{ if and $last (ne .Role "assistant") }}' + f.header.format(role="assistant") + "{{ end }}")
    parts.append("{{ end }}")
    return "".join(parts)


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def ollama_modelfile(tokenizer: Any, end_tokens: list[str]) -> OllamaModelfile:
    """The Modelfile's text for a merged folder whose tokenizer is `tokenizer`; `end_tokens`: every token that ends
    an assistant turn (lorapipe.data.end_tokens), each a `PARAMETER stop`."""
    header = ["# Ollama Modelfile written by lorapipe beside the merged weights.",
              "# Build from this folder: ollama create <name> -f Modelfile"]
    family = detect_family(tokenizer.chat_template or "")
    template: Optional[str] = None
    if family is None:
        note = "the chat template is neither ChatML nor Llama 3, the families lorapipe translates"
    else:
        try:
            layout = read_layout(tokenizer, family)
            template = go_template(layout)
            if '"""' in template:
                raise NotTranslated('the translated template contains """, which a Modelfile cannot quote')
        except NotTranslated as exc:
            template, note = None, f"the {family.name} chat template does not follow the family's layout: {exc}"
        else:
            left_out = []
            if "tool" in (tokenizer.chat_template or ""):  # said only where the template has them to leave out
                left_out.append("the chat template renders tool definitions and tool calls, which this TEMPLATE "
                                "does not carry: serve tool calling with the model's own Jinja template (llama.cpp "
                                "--jinja, transformers)")
            if layout.prefix:
                left_out.insert(0, f"the BOS token {layout.prefix} is left to the runtime, which adds it when it "
                                   "tokenizes")
            if "trim" in (tokenizer.chat_template or ""):
                left_out.append("the Jinja template trims message whitespace; Ollama passes messages as sent")
            note = "; ".join(left_out) or "nothing"
    if template is None:
        header += [f"# No TEMPLATE: {note}.",
                   "# Ollama falls back to the template it detects, if any: write one before serving chat."]
    else:
        header += [f"# TEMPLATE: translated from the tokenizer's {family.name} chat template and checked against "
                   "apply_chat_template.", f"# Not in it: {note}."]
    lines = header + ["", "FROM .", ""]
    if template is not None:
        lines += [f'TEMPLATE """{template}"""', ""]
    lines += [f"PARAMETER stop {_quoted(token)}" for token in end_tokens]
    return OllamaModelfile("\n".join(lines) + "\n", family.name if template is not None else None, template, note)


def write_modelfile(folder: str | Path, tokenizer: Any, end_tokens: list[str]) -> OllamaModelfile:
    modelfile = ollama_modelfile(tokenizer, end_tokens)
    (Path(folder) / MODELFILE).write_text(modelfile.text, encoding="utf-8")
    return modelfile
