"""Evaluation: the text metrics agree with rouge-score and sacrebleu, the stop statistics on hand-made token lists,
batched generation equals one-at-a-time generation on the tiny model, and a saved model folder is scored on the
same rows, the same way, as the adapter's base and tuned models."""

import json
import math

import pytest
import torch

from lorapipe.config import EvaluateSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.data.end_tokens import end_token_ids
from lorapipe.data.render import render
from lorapipe.evaluation.metrics import (
    generate_batched,
    generate_scores,
    stop_statistics,
    text_scores,
)
from lorapipe.hardware.plan import PhasePlan

CPU_F32 = PhasePlan(phase="evaluate", device="cpu", dtype="float32", batch_size=3, max_seq_length=128, reason="test")


# --- text metrics -----------------------------------------------------------------------------------------------

PAIRS = [  # (prediction, reference)
    ("The Eagles won Super Bowl LIX.", "The Eagles won Super Bowl LIX."),  # identical
    ("It was held  in New Orleans.\n", "It was held in New Orleans."),  # same words, other whitespace
    ("the game was played in new orleans", "Super Bowl LIX was held at the Caesars Superdome in New Orleans."),
    ("Kendrick Lamar headlined the halftime show", "The halftime show was headlined by Kendrick Lamar."),
    ("", "Philadelphia beat Kansas City 40-22."),  # a model that said nothing
]


def test_text_metrics_are_the_libraries_own_figures():
    import sacrebleu
    from rouge_score import rouge_scorer

    predictions, references = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    scores = text_scores(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected_rouge = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in PAIRS) / len(PAIRS)
    assert scores["rouge_l"] == pytest.approx(expected_rouge)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [references]).score)
    assert scores["exact_match"] == pytest.approx(2 / 5)  # whitespace normalised: the first two pairs match
    assert 0.0 < scores["rouge_l"] < 1.0 and 0.0 < scores["bleu"] < 100.0


def test_identical_text_scores_the_top_of_each_scale_and_unasked_metrics_are_none():
    same = ["Super Bowl LIX was held at the Caesars Superdome in New Orleans.", "The Eagles won it."]
    assert text_scores(same, same) == pytest.approx({"exact_match": 1.0, "rouge_l": 1.0, "bleu": 100.0, "chrf": 100.0})
    assert text_scores(["a b c"], ["x y z"], metrics=["rouge_l"]) == {
        "exact_match": None, "rouge_l": 0.0, "bleu": None, "chrf": None}
    assert text_scores([], []) == dict.fromkeys(("exact_match", "rouge_l", "bleu", "chrf"))
    with pytest.raises(ValueError, match="meteor"):
        text_scores(["a"], ["a"], metrics=["meteor"])


# --- stop statistics --------------------------------------------------------------------------------------------

def test_stop_rate_and_overshoot_on_hand_made_generations():
    end, turn_end = 2, 9  # EOS and the template's turn end: either one stops a generation
    generations = [
        [5, 6, 7, 2],  # stopped on EOS after 3 tokens; the reference has 3: no overshoot
        [5, 6, 7, 8, 9],  # stopped on the turn end after 4 tokens; the reference has 2: overshoot 2
        [5, 6, 7, 8, 5, 6, 7, 8],  # never stopped (the budget of 8 ran out); reference 3: overshoot 5
        [2],  # stopped at once: 0 tokens, nothing beyond the reference
    ]
    stats = stop_statistics(generations, reference_lengths=[3, 2, 3, 4], end_ids=[end, turn_end])
    assert stats.stopped == [True, True, False, True]
    assert stats.lengths == [3, 4, 8, 0]
    assert stats.overshoots == [0, 2, 5, 0]
    assert stats.stop_rate == pytest.approx(3 / 4)
    assert stats.overshoot == pytest.approx(7 / 4)
    # with EOS alone as the end, the turn-end row runs on: it did not stop
    assert stop_statistics(generations, [3, 2, 3, 4], [end]).stopped == [True, False, False, True]
    empty = stop_statistics([], [], [end])
    assert empty.stop_rate is None and empty.overshoot is None
    with pytest.raises(ValueError):
        stop_statistics([[1]], [], [end])


# --- generation on the tiny model -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from lorapipe.models.loading import load_model

    return load_model(str(tiny_model_dir), "float32", device="cpu")


@pytest.fixture(scope="module")
def prompts_of_different_lengths(tiny_tokenizer, quickstart_records):
    asked = [r.messages[0]["content"] for r in quickstart_records if r.messages][:3]
    answer = next(r.messages[-1]["content"] for r in quickstart_records if r.messages)
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": asked[0]}],
        [{"role": "user", "content": " ".join(asked)}],
        [{"role": "user", "content": asked[1]}, {"role": "assistant", "content": answer},
         {"role": "user", "content": asked[2]}],
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": asked[2]}],
    ]
    prompts = [render(tiny_tokenizer, c, None, add_generation_prompt=True) for c in conversations]
    lengths = [len(tiny_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert len(set(lengths)) == len(lengths) and max(lengths) > 3 * min(lengths)  # padding really happens
    return prompts


def test_batched_generation_equals_one_at_a_time(tiny_model, tiny_tokenizer, prompts_of_different_lengths):
    prompts, ends = prompts_of_different_lengths, end_token_ids(tiny_tokenizer)
    side = tiny_tokenizer.padding_side
    one_by_one = generate_batched(tiny_model, tiny_tokenizer, prompts, 16, 1, ends, seed=0)
    batched = generate_batched(tiny_model, tiny_tokenizer, prompts, 16, 3, ends, seed=0)
    assert batched == one_by_one
    assert tiny_tokenizer.padding_side == side  # left only while generating
    # The random tiny model never says EOS; a token it says mid-way in some rows (not all) acts as an end token, so
    # rows of one batch stop at different steps and the finished ones are padded while the others go on.
    counts = {t: sum(t in row for row in one_by_one) for row in one_by_one for t in row[2:12]}
    stop_token = next(t for t, n in sorted(counts.items()) if 0 < n < len(prompts))
    ends_too = ends + [stop_token]
    one_by_one = generate_batched(tiny_model, tiny_tokenizer, prompts, 16, 1, ends_too, seed=0)
    for size in (3, 4):
        assert generate_batched(tiny_model, tiny_tokenizer, prompts, 16, size, ends_too, seed=0) == one_by_one
    stopped = stop_statistics(one_by_one, [0] * len(prompts), ends_too).stopped
    assert any(stopped) and not all(stopped)
    assert all(row[-1] == stop_token and len(row) <= 16 for row, s in zip(one_by_one, stopped) if s)
    assert all(len(row) == 16 for row, s in zip(one_by_one, stopped) if not s)


def test_generate_scores_reports_every_metric_and_a_sample_per_row(tiny_model, tiny_tokenizer, quickstart_records):
    rows = [r for r in quickstart_records if r.messages][:5]
    scores, samples = generate_scores(tiny_model, tiny_tokenizer, rows, max_new_tokens=8, batch_size=4, seed=1)
    assert set(scores) == {"exact_match", "rouge_l", "bleu", "chrf", "stop_rate", "overshoot", "generation_seconds"}
    assert scores["stop_rate"] == 0.0  # random weights: every row runs to the budget
    assert scores["generation_seconds"] > 0 and 0.0 <= scores["rouge_l"] <= 1.0
    reference_tokens = [len(tiny_tokenizer(r.messages[-1]["content"].strip(), add_special_tokens=False)["input_ids"])
                        for r in rows]
    assert scores["overshoot"] == pytest.approx(sum(max(0, 8 - n) for n in reference_tokens) / len(rows))
    assert [s["source"] for s in samples] == [f"{r.source}:{r.line}" for r in rows]
    assert all(s["new_tokens"] == 8 and s["stopped"] is False for s in samples)
    assert samples[0]["prompt"] == rows[0].messages[0]["content"][:500]


# --- a saved model folder, scored like the adapter's models ------------------------------------------------------

@pytest.fixture(scope="module")
def adapter_and_merged(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    """A hand-made LoRA adapter (random A and B, so it changes the model) in the folder layout the hf backend
    writes, and the same adapter merged into a plain transformers folder."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    work = tmp_path_factory.mktemp("eval")
    adapter_dir, merged_dir = work / "adapter", work / "merged"
    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(str(adapter_dir))
    tiny_tokenizer.save_pretrained(str(adapter_dir))
    (adapter_dir / "lorapipe_adapter.json").write_text(json.dumps(
        {"base_model": str(tiny_model_dir), "base_revision": None, "trust_remote_code": False,
         "plan": {"backend": "hf"}}))
    model.merge_and_unload().save_pretrained(str(merged_dir))
    tiny_tokenizer.save_pretrained(str(merged_dir))
    return adapter_dir, merged_dir


def test_a_model_folder_is_scored_on_the_rows_and_the_way_the_adapter_is(adapter_and_merged, tiny_model_dir,
                                                                          quickstart_records):
    from lorapipe.phases.evaluate import evaluate_adapter, score_model_folder

    adapter_dir, merged_dir = adapter_and_merged
    test = ConversationDataset(quickstart_records[:10], name="test")
    evaluate = EvaluateSection(max_samples=7, generation_samples=4, max_new_tokens=10)
    metrics = evaluate_adapter(str(adapter_dir), test, CPU_F32, evaluate, seed=5)
    assert metrics.scored_rows == 7 and metrics.generated_rows == 4 and metrics.memory_gib > 0
    assert metrics.base.perplexity != pytest.approx(metrics.tuned.perplexity)  # the adapter does something
    assert metrics.generation == {"max_new_tokens": 10, "batch_size": 3, "greedy": True, "seed": 5,
                                  "padding": "left", "end_tokens": ["<|im_end|>"]}
    assert set(metrics.samples[0]) >= {"source", "prompt", "reference", "base", "tuned", "base_stopped",
                                       "tuned_stopped"}
    for tuned in (metrics.tuned, metrics.base):
        for name in ("bleu", "chrf", "rouge_l", "exact_match", "stop_rate", "overshoot", "generation_seconds"):
            assert getattr(tuned, name) is not None, name

    for folder, label in ((merged_dir, "tuned"), (tiny_model_dir, "base")):
        scores, generations = score_model_folder(str(folder), "sft", test, CPU_F32, evaluate, seed=5)
        expected = getattr(metrics, label)
        assert scores.loss == pytest.approx(expected.loss, rel=1e-4)
        assert math.isclose(scores.perplexity, expected.perplexity, rel_tol=1e-3)
        assert [g["prediction"] for g in generations] == [s[label] for s in metrics.samples]
        assert [g["source"] for g in generations] == [s["source"] for s in metrics.samples]
        for name in ("rouge_l", "bleu", "chrf", "exact_match", "stop_rate", "overshoot"):
            assert getattr(scores, name) == pytest.approx(getattr(expected, name)), name
