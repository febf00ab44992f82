"""Render a conversation with the model's chat template and build the assistant-only loss mask.

One implementation serves training, evaluation and the learns-to-stop audit, so what the audit checks is
exactly what the trainer sees. Trainable spans are found by rendering growing prefixes of the conversation
(`messages[:i]` with the generation prompt, then `messages[:i+1]`): everything the template emits for an
assistant turn, its turn-end/EOS token included, is trained; everything else is masked.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import operator
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from lorapipe.data.records import Record

# Used only when the tokenizer ships no chat template (base models): Alpaca-style, EOS after every answer,
# like the seed notebook's template, so the model learns to stop.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'tool' %}### Tool result:\n{{ m['content'] }}\n\n"
    "{% else %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


# model.chat_template by name: a template chosen on purpose (a base model without one, or to replace the tokenizer's),
# with the special tokens it writes, which are added to the tokenizer where missing and trained (new embedding rows)
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
BUILTIN_TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "chatml": (CHATML_TEMPLATE, ("<|im_start|>", "<|im_end|>")),
    "llama3": (LLAMA3_TEMPLATE, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "alpaca": (FALLBACK_CHAT_TEMPLATE, ()),
}


class RenderError(ValueError):
    pass


def ensure_chat_template(tokenizer: Any, override: Optional[str] = None) -> str:
    """Give the tokenizer a chat template: the config's (a built-in by name, a Jinja file or a Jinja string), else
    its own, else the fallback. Returns its source. A built-in's special tokens missing from the vocabulary are
    added (`tokenizer.lorapipe_added_tokens`): the model's embeddings grow by as many rows, which training trains."""
    tokenizer.lorapipe_added_tokens = list(getattr(tokenizer, "lorapipe_added_tokens", None) or [])
    if override in BUILTIN_TEMPLATES:
        template, tokens = BUILTIN_TEMPLATES[override]
        tokenizer.chat_template = template
        vocab = tokenizer.get_vocab()
        missing = [t for t in tokens if t not in vocab]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing},
                                         replace_extra_special_tokens=False)
            tokenizer.lorapipe_added_tokens += missing
        return f"builtin:{override}"
    if override:
        path = Path(override)
        tokenizer.chat_template = path.read_text(encoding="utf-8") if path.exists() else override
        return "config"
    if getattr(tokenizer, "chat_template", None):
        return "tokenizer"
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return "fallback"


@dataclass
class Encoded:
    input_ids: list[int]
    assistant_mask: list[int]
    rendered: str
    full_length: int  # tokens before truncation
    truncated: bool


def tool_schemas(tools: Optional[str]) -> Optional[list]:
    """A row's `tools` (ShareGPT `tools`, chat `tools`) as the list chat templates take, or None."""
    if not tools:
        return None
    try:
        parsed = json.loads(tools)
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, list) else None


def template_kwargs(tokenizer: Any) -> dict[str, Any]:
    """`model.chat_template_kwargs` (e.g. Qwen3's enable_thinking), attached by `load_tokenizer`: every render of
    training, evaluation, predict and export passes them to the template."""
    return dict(getattr(tokenizer, "lorapipe_template_kwargs", None) or {})


def template_record(tokenizer: Any) -> dict[str, Any]:
    """What every render of this tokenizer uses: the template's origin, sha256 and switches, and the tokens a built-in
    template added (saved beside a tokenizer, shown in the validation report, recorded on the version)."""
    import hashlib

    template = getattr(tokenizer, "chat_template", None) or ""
    return {"chat_template_source": getattr(tokenizer, "lorapipe_chat_template_source", "tokenizer"),
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str)
            else None,
            "chat_template_kwargs": template_kwargs(tokenizer),
            "added_tokens": list(getattr(tokenizer, "lorapipe_added_tokens", None) or [])}


PROBE_TRACE = "lorapipe-probe-trace"


def _probed(tokenizer: Any, attribute: str, probe: Any) -> Any:
    """A fact read off the chat template by rendering a probe (`probe()`), kept on the tokenizer for this template
    and these switches: a template replaced later is probed again."""
    key = (getattr(tokenizer, "chat_template", None), repr(sorted(template_kwargs(tokenizer).items())))
    cached = getattr(tokenizer, attribute, None)
    if cached is None or cached[0] != key:
        cached = (key, probe())
        setattr(tokenizer, attribute, cached)
    return cached[1]


def template_reads_reasoning(tokenizer: Any) -> bool:
    """Whether the chat template renders an assistant turn's `reasoning_content` (Qwen3's does); a template that
    ignores the field gets the trace back inside the content as `<think>...</think>`, as the data wrote it."""
    def probe() -> bool:
        messages = [{"role": "user", "content": "u"},
                    {"role": "assistant", "content": "a", "reasoning_content": PROBE_TRACE}]
        try:
            return PROBE_TRACE in tokenizer.apply_chat_template(messages, tokenize=False, **template_kwargs(tokenizer))
        except Exception:  # noqa: BLE001 - a template that refuses the probe reads no reasoning field
            return False

    return _probed(tokenizer, "_lorapipe_reads_reasoning", probe)


def turn_end_text(tokenizer: Any) -> str:
    """What the template writes after an assistant's answer (ChatML: `<|im_end|>` and a newline), read off a probe;
    "" when it writes nothing or cannot render a plain exchange."""
    def probe() -> str:
        messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": PROBE_TRACE}]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, **template_kwargs(tokenizer))
        except Exception:  # noqa: BLE001 - a template that cannot render a plain exchange has no turn end to find
            return ""
        return text.split(PROBE_TRACE, 1)[1] if PROBE_TRACE in text else ""

    return _probed(tokenizer, "_lorapipe_turn_end", probe)


def _inline_reasoning(m: dict) -> dict:
    if not m.get("reasoning_content"):
        return m
    out = {k: v for k, v in m.items() if k != "reasoning_content"}
    out["content"] = f"<think>\n{m['reasoning_content']}\n</think>\n\n{m.get('content') or ''}"
    return out


def render(tokenizer: Any, messages: list[dict], tools: Optional[list], add_generation_prompt: bool) -> str:
    kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt,
                              **template_kwargs(tokenizer)}
    if tools:  # templates that render tool schemas get them; others ignore them
        kwargs["tools"] = tools
    if any(m.get("reasoning_content") for m in messages) and not template_reads_reasoning(tokenizer):
        messages = [_inline_reasoning(m) for m in messages]
    return tokenizer.apply_chat_template(messages, **kwargs)


def trainable_spans(tokenizer: Any, record: Record) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans [start, end) of every assistant turn.

    A turn's span runs from the end of the prompt before it (rendered with the generation prompt) to the end of the
    conversation rendered through it. Templates that render a turn differently once later turns follow (Qwen3's
    strips the reasoning of turns before the last question and gives the last turn an empty think block) break that
    prefix rule: such a turn is located in the whole conversation instead, from where the prompt before it stops
    agreeing with it to the end of its answer and the turn-end text the template writes after an answer."""
    if record.text is not None:
        text = record.text + (tokenizer.eos_token or "")
        return text, [(0, len(text))]
    msgs, tools = record.messages, tool_schemas(record.tools)
    full = render(tokenizer, msgs, tools, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, msgs[:i], tools, add_generation_prompt=True) if i else ""
        # the last turn rendered through is the whole conversation, rendered already
        through = full if i == len(msgs) - 1 else render(tokenizer, msgs[: i + 1], tools, add_generation_prompt=False)
        if full.startswith(through) and through.startswith(before):
            spans.append((len(before), len(through)))
            continue
        # the conversation before the turn must still render as it does alone: only the turn itself may change
        history = render(tokenizer, msgs[:i], tools, add_generation_prompt=False) if i else ""
        if not full.startswith(history):
            raise RenderError(
                "the chat template does not render conversations prefix by prefix, so assistant turns cannot be "
                "located; set model.chat_template to a template that does"
            )
        after = max([len(history), *(end for _, end in spans[-1:])])
        spans.append(_span_in_conversation(tokenizer, full, before, m, after))
    return full, spans


def _span_in_conversation(tokenizer: Any, full: str, before: str, turn: dict, after: int) -> tuple[int, int]:
    """A turn the prefix rule cannot locate, found in the whole conversation (see `trainable_spans`)."""
    start = max(after, len(os.path.commonprefix([before, full])))
    answer = (turn.get("content") or "").strip()
    at = full.find(answer, start) if answer else start
    if at < 0:
        raise RenderError("the chat template does not render an assistant turn's content as given, so its tokens "
                          "cannot be located; set model.chat_template to a template that does")
    end = at + len(answer)
    closing = turn_end_text(tokenizer)
    if closing and full.startswith(closing, end):
        end += len(closing)
    return start, end


def trained_turns(tokenizer: Any, record: Record) -> list[str]:
    """The text each assistant turn trains, as the template renders the row (its trained span)."""
    text, spans = trainable_spans(tokenizer, record)
    return [text[a:b] for a, b in spans]


def reasoning_coverage(tokenizer: Any, record: Record) -> tuple[int, int]:
    """(turns with a reasoning trace, those whose trace lies inside the turn's trained span as the template renders
    the row): a template that strips history traces (Qwen3's) or every trace (DeepSeek-R1's) trains fewer."""
    turns = [m for m in record.messages if m["role"] == "assistant"]
    traced = [i for i, m in enumerate(turns) if m.get("reasoning_content")]
    if not traced:
        return 0, 0
    trained = trained_turns(tokenizer, record)
    return len(traced), sum(1 for i in traced if i < len(trained) and turns[i]["reasoning_content"].strip()
                            in trained[i])


def _tokenize_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer directly: ~3x less overhead per row than __call__
        enc = backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


_start, _end = operator.itemgetter(0), operator.itemgetter(1)


def span_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for tokens overlapping a span (offsets and spans both ascend); found by bisection, set by slices.

    A token with an empty offset span (e.g. a special token like EOS) belongs to the span it closes."""
    n = len(offsets)
    mask = [0] * n
    if not n or not spans:
        return mask
    for s_start, s_end in spans:
        # the first token ending after the span starts; the first starting at or after its end (bisection on the
        # offsets themselves: no per-row lists of starts and ends)
        lo = bisect.bisect_right(offsets, s_start, key=_end)
        hi = bisect.bisect_left(offsets, s_end, key=_start)
        if hi > lo:
            mask[lo:hi] = [1] * (hi - lo)
        while hi < n and offsets[hi][0] == s_end and offsets[hi][1] == s_end:  # empty tokens that close the span
            mask[hi] = 1
            hi += 1
    return mask


def encode(tokenizer: Any, record: Record, max_length: Optional[int] = None) -> Encoded:
    """Token ids and assistant mask (1 = trained) for one record, truncated to `max_length` if given."""
    text, spans = trainable_spans(tokenizer, record)
    ids, offsets = _tokenize_with_offsets(tokenizer, text)
    return _encoded(list(ids), offsets, text, spans, max_length)


def encode_judged_answer(tokenizer: Any, record: Record, max_length: int) -> tuple[list[int], list[int]]:
    """(ids, mask) of a row with 1 on its last assistant turn's tokens only: the answer a preference loss judges
    (earlier assistant turns belong to the prompt, as TRL's losses have it), cut to `max_length`."""
    text, spans = trainable_spans(tokenizer, record)
    ids, offsets = _tokenize_with_offsets(tokenizer, text)
    return list(ids)[:max_length], span_mask(offsets, spans[-1:])[:max_length]


def _encoded(ids: list[int], offsets: list[tuple[int, int]], text: str, spans: list[tuple[int, int]],
             max_length: Optional[int]) -> Encoded:
    mask = span_mask(offsets, spans)
    full = len(ids)
    truncated = max_length is not None and full > max_length
    if truncated:
        ids, mask = ids[:max_length], mask[:max_length]
    return Encoded(ids, mask, text, full, truncated)


@contextlib.contextmanager
def tokenizer_threads() -> Iterator[None]:
    """The Rust tokenizer's own threads for a batch call (lorapipe.quiet turns them off for the process, so that a
    later fork does not warn); set back afterwards, so a fork after the batch does not warn either."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        os.environ["TOKENIZERS_PARALLELISM"] = before if before is not None else "false"


def encode_batch(tokenizer: Any, records: list[Record],
                 max_length: Optional[int] = None) -> list[Encoded | RenderError]:
    """`encode` for many records at once, exactly as one by one (each the same ids and mask), the tokenizing done
    by the Rust tokenizer over the batch on every core; a record its template cannot render gets its RenderError."""
    rendered: list[tuple[str, list[tuple[int, int]]] | RenderError] = []
    for rec in records:
        try:
            rendered.append(trainable_spans(tokenizer, rec))
        except RenderError as exc:
            rendered.append(exc)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    texts = [r[0] for r in rendered if not isinstance(r, RenderError)]
    if backend is None or backend.padding is not None or backend.truncation is not None:
        # a slow (Python) tokenizer, or a fast one whose file sets padding or truncation (a batch would be padded to
        # its longest row): one at a time, exactly as `encode`
        tokenized = iter([_tokenize_with_offsets(tokenizer, t) for t in texts])
    else:
        with tokenizer_threads():
            tokenized = iter([(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)])
    out: list[Encoded | RenderError] = []
    for r in rendered:
        if isinstance(r, RenderError):
            out.append(r)
        else:
            ids, offsets = next(tokenized)
            out.append(_encoded(list(ids), offsets, r[0], r[1], max_length))
    return out


def decode(tokenizer: Any, ids: list[int]) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.decode(ids, skip_special_tokens=False)
    return tokenizer.decode(ids, skip_special_tokens=False)


def decode_batch(tokenizer: Any, batch: list[list[int]]) -> list[str]:
    """`decode` of many id lists, in the Rust tokenizer's threads."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return [tokenizer.decode(ids, skip_special_tokens=False) for ids in batch]
    with tokenizer_threads():
        return backend.decode_batch(batch, skip_special_tokens=False)
