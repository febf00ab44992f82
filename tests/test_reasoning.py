"""Reasoning traces (a `reasoning_content` field, or `<think>...</think>` before the answer): read and counted; kept
traces trained where the model's own template renders them and dropped ones nowhere, checked in the labels with
templates written here that behave like the public ones: Qwen3's (renders `reasoning_content`, strips the traces of
turns before the last question, gives the last turn an empty think block, `enable_thinking`) and DeepSeek-R1's
(strips every `<think>` block from assistant turns, opens one in the generation prompt)."""

import copy
import json

import pytest

from lorapipe.data.formats import read_records
from lorapipe.data.records import Record
from lorapipe.data.render import encode, render, trained_turns
from lorapipe.data.validation import validate_dataset
from tests.conftest import write_lines

QWEN3_LIKE = (
    "{%- set ns = namespace(last_query=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}{{- '<|im_start|>user\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- elif m.role == 'assistant' -%}"
    "{%- set content = m.content -%}{%- set reasoning = '' -%}"
    "{%- if m.reasoning_content is defined and m.reasoning_content is not none -%}"
    "{%- set reasoning = m.reasoning_content -%}"
    "{%- elif '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}"
    "{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{{- content + eos_token + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}{%- endif -%}"
)

R1_LIKE = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}{{- '<|User|>' + m.content -}}"
    "{%- elif m.role == 'assistant' -%}{%- set content = m.content -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
    "{{- '<|Assistant|>' + content + eos_token -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|Assistant|><think>\\n' -}}{%- endif -%}"
)

ROWS = [
    # a trace as a field, on the last of two turns, and one in the first turn (history: Qwen3 strips it)
    {"messages": [{"role": "user", "content": "What is 2+2?"},
                  {"role": "assistant", "content": "4.", "reasoning_content": "Two and two make four."},
                  {"role": "user", "content": "And 3+3?"},
                  {"role": "assistant", "content": "6.", "reasoning_content": "Three and three make six."}]},
    # a trace inside the content, as R1-style exports write it
    {"messages": [{"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "<think>\nFrance's capital is Paris.\n</think>\n\nParis."}]},
    {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]},
]


def tokenizer_with(template, tiny_tokenizer, **kwargs):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = template
    tok.lorapipe_template_kwargs = kwargs
    for attr in ("_lorapipe_reads_reasoning", "_lorapipe_turn_end"):
        if hasattr(tok, attr):
            delattr(tok, attr)
    return tok


@pytest.fixture()
def data(tmp_path):
    return write_lines(tmp_path / "reasoning.jsonl", [json.dumps(r) + "\n" for r in ROWS])


def test_traces_are_read_from_the_field_and_from_think_blocks(data):
    records = read_records([str(data)]).records
    first, second, plain = records
    assert [m.get("reasoning_content") for m in first.messages if m["role"] == "assistant"] == \
        ["Two and two make four.", "Three and three make six."]
    assert second.messages[-1] == {"role": "assistant", "content": "Paris.",
                                   "reasoning_content": "France's capital is Paris."}
    assert not any("reasoning_content" in m for m in plain.messages)
    # a trace is part of the row: the same answers with another trace are no duplicate
    other = Record("x", 1, "", "messages", messages=[*second.messages[:-1], {**second.messages[-1],
                                                                             "reasoning_content": "Guess."}])
    assert other.content_key() != second.content_key()


def test_qwen3_like_keep_trains_the_last_turns_trace_and_reports_the_history_trace_it_strips(data, tiny_tokenizer):
    tok = tokenizer_with(QWEN3_LIKE, tiny_tokenizer)
    report = validate_dataset([str(data)], tokenizer=tok, max_seq_length=512, run_expectations=False).report
    r = report.reasoning
    assert (r.rows, r.traces, r.trained, r.lost, r.template_reads_field) == (2, 3, 2, 1, True)
    warning = next(p for p in report.problems if p.code == "reasoning_lost_in_history")
    assert warning.severity == "warning" and "1 of 3" in warning.message and "last turn of a row" in warning.fix
    assert report.passed and "reasoning: 3 trace(s) in 2 row(s), kept; 2 trained, 1 left out" in \
        "\n".join(report.summary_lines())
    first = read_records([str(data)]).records[0]
    turns = trained_turns(tok, first)
    assert "Three and three make six." in turns[1] and turns[1].endswith(tok.eos_token + "\n")
    assert "Two and two" not in turns[0] and turns[0].startswith("4.")  # the history turn: its answer alone
    # the mask is the trained text: the kept trace's tokens are labels, the prompt's are not
    enc = encode(tok, first)
    labels = tok.decode([i for i, m in zip(enc.input_ids, enc.assistant_mask) if m])
    assert "Three and three make six" in labels and "And 3+3?" not in labels


def test_qwen3_like_drop_trains_the_answers_alone(data, tiny_tokenizer):
    tok = tokenizer_with(QWEN3_LIKE, tiny_tokenizer)
    outcome = validate_dataset([str(data)], tokenizer=tok, max_seq_length=512, run_expectations=False,
                               reasoning="drop")
    r = outcome.report.reasoning
    assert (r.setting, r.traces, r.leaked) == ("drop", 3, 0) and outcome.report.passed
    assert not any(p.code.startswith("reasoning") for p in outcome.report.problems)
    paris = outcome.records[1]
    assert "reasoning_content" not in paris.messages[-1]
    labels = "".join(trained_turns(tok, paris))
    assert "France's capital" not in labels and labels.startswith("<think>\n\n</think>\n\nParis.")


def test_an_r1_like_template_that_strips_every_trace_fails_keep_with_the_fix_and_passes_drop(data, tiny_tokenizer):
    tok = tokenizer_with(R1_LIKE, tiny_tokenizer)
    kept = validate_dataset([str(data)], tokenizer=tok, max_seq_length=512, run_expectations=False).report
    assert (kept.reasoning.trained, kept.reasoning.lost, kept.reasoning.template_reads_field) == (0, 3, False)
    error = next(p for p in kept.problems if p.code == "reasoning_not_trained")
    assert not kept.passed and "none of the 3" in error.message and "data.reasoning: drop" in error.fix
    dropped = validate_dataset([str(data)], tokenizer=tok, max_seq_length=512, run_expectations=False,
                               reasoning="drop").report
    assert dropped.passed and dropped.reasoning.leaked == 0
    # its generation prompt opens a think block the answer's turn does not render: located all the same (the
    # blank lines R1's split leaves before the answer included, as the template writes them)
    paris = read_records([str(data)]).records[1]
    assert trained_turns(tok, paris) == ["\n\nParis." + tok.eos_token]


def test_a_template_without_the_field_trains_the_trace_inside_the_content(data, tiny_tokenizer):
    """The tiny model's own template renders content only: the trace goes back as the data wrote it."""
    report = validate_dataset([str(data)], tokenizer=tiny_tokenizer, max_seq_length=512,
                              run_expectations=False).report
    assert (report.reasoning.trained, report.reasoning.lost, report.reasoning.template_reads_field) == (3, 0, False)
    paris = read_records([str(data)]).records[1]
    assert "<think>\nFrance's capital is Paris.\n</think>\n\nParis." in trained_turns(tiny_tokenizer, paris)[0]


def test_template_switches_reach_every_render_and_travel_with_the_saved_tokenizer(tiny_tokenizer, tmp_path):
    from lorapipe.models.loading import TEMPLATE_RECORD, load_tokenizer, save_tokenizer

    prompt = [{"role": "user", "content": "Hi"}]
    thinking = tokenizer_with(QWEN3_LIKE, tiny_tokenizer)
    plain = tokenizer_with(QWEN3_LIKE, tiny_tokenizer, enable_thinking=False)
    assert render(thinking, prompt, None, True).endswith("<|im_start|>assistant\n")
    assert render(plain, prompt, None, True).endswith("<think>\n\n</think>\n\n")
    save_tokenizer(plain, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / TEMPLATE_RECORD).read_text())
    assert saved["chat_template_kwargs"] == {"enable_thinking": False} and saved["chat_template_sha256"]
    again = load_tokenizer(str(tmp_path / "adapter"))  # evaluation, merge and predict load it so
    assert render(again, prompt, None, True) == render(plain, prompt, None, True)
    assert load_tokenizer(str(tmp_path / "adapter"), template_kwargs={}).lorapipe_template_kwargs == {}
