"""The promotion rule on hand-made scores: beat the base and the stage's holder on the primary metric by the
margin, pass the merge check, learn to stop; every refusal says why."""

import pytest

from lorapipe.evaluation.metrics import EvalMetrics, ModelScores
from lorapipe.registry import StageHolderScores, decide_stage, improvement


def _metrics(base_ppl=10.0, tuned_ppl=8.0, tuned_rouge=0.5, stop=0.9):
    base = ModelScores(loss=2.3, perplexity=base_ppl, rouge_l=0.2, stop_rate=0.1)
    tuned = ModelScores(loss=2.0, perplexity=tuned_ppl, rouge_l=tuned_rouge, stop_rate=stop)
    return EvalMetrics(test_rows=10, scored_rows=10, generated_rows=4, scored_tokens=100, base=base, tuned=tuned,
                       perplexity_gain=(base_ppl - tuned_ppl) / base_ppl, tuned_beats_base=tuned_ppl < base_ppl,
                       samples=[])


def _holder(ppl, rouge=0.4):
    return StageHolderScores(stage="production", version="v1", scores={"perplexity": ppl, "loss": 2.1,
                                                                       "rouge_l": rouge, "stop_rate": 0.8})


def test_improvement_is_relative_and_knows_which_way_is_better():
    assert improvement(8.0, 10.0, lower_is_better=True) == pytest.approx(0.2)
    assert improvement(0.6, 0.5, lower_is_better=False) == pytest.approx(0.2)
    assert improvement(12.0, 10.0, lower_is_better=True) == pytest.approx(-0.2)


def test_beating_base_and_holder_promotes_with_both_comparisons_in_the_reason():
    stage, reason = decide_stage(_metrics(), True, "production", 0.05, holder=_holder(9.0))
    assert stage == "production"
    assert "beats base 10" in reason and "version v1, the production holder, at 9" in reason


def test_worse_than_the_holder_is_refused_and_the_holder_keeps_its_stage():
    stage, reason = decide_stage(_metrics(tuned_ppl=8.0), True, "production", 0.0, holder=_holder(7.5))
    assert stage is None
    assert "does not beat version v1, which holds production, at 7.5" in reason and "v1 keeps production" in reason


def test_the_margin_applies_to_base_and_holder():
    assert decide_stage(_metrics(tuned_ppl=9.5), True, "staging", 0.1)[0] is None  # 5% over base < 10%
    stage, reason = decide_stage(_metrics(tuned_ppl=8.0), True, "staging", 0.1, holder=_holder(8.5))
    assert stage is None and "register.margin=10.0%" in reason  # 5.9% over the holder < 10%


def test_the_primary_metric_can_be_a_generation_metric_and_must_have_been_measured():
    promoted, _ = decide_stage(_metrics(tuned_rouge=0.5), True, "staging", 0.0, "rouge_l", holder=_holder(9, 0.45))
    assert promoted == "staging"
    stage, reason = decide_stage(_metrics(tuned_rouge=0.4), True, "staging", 0.0, "rouge_l", holder=_holder(9, 0.45))
    assert stage is None and "higher is better" in reason
    unmeasured = _metrics()
    unmeasured.tuned.rouge_l = None
    stage, reason = decide_stage(unmeasured, True, "staging", 0.0, "rouge_l")
    assert stage is None and "evaluate.generation_samples" in reason


def test_a_model_that_does_not_stop_or_a_failed_merge_is_never_promoted():
    stage, reason = decide_stage(_metrics(stop=0.5), True, "staging", 0.0, min_stop_rate=0.8)
    assert stage is None and "learned-to-stop rate 50% is below register.min_stop_rate=80%" in reason
    assert decide_stage(_metrics(), False, "staging", 0.0) == (None, "the merged model failed its logits check")
    assert decide_stage(_metrics(), True, "none", 0.0)[0] is None


def test_no_holder_means_base_only_with_the_reason_noted():
    stage, reason = decide_stage(_metrics(), True, "staging", 0.0,
                                 holder=StageHolderScores(stage="staging", note="no version held staging before"))
    assert stage == "staging" and "no version held staging before" in reason


def test_a_metric_that_is_not_a_number_never_promotes():
    stage, reason = decide_stage(_metrics(base_ppl=float("nan"), tuned_ppl=float("nan")), True, "staging", 0.0)
    assert stage is None and "not a finite number" in reason
    stage, reason = decide_stage(_metrics(), True, "production", 0.0, holder=_holder(float("inf")))
    assert stage is None and "not comparable" in reason


def test_against_the_holder_the_merged_models_are_compared_alike():
    """Scored by the same code, the candidate's merged model is what is compared with the holder's merged model."""
    holder = _holder(8.2)
    holder.candidate = {"perplexity": 8.3}  # this version merged: a little worse than the holder on these rows
    stage, reason = decide_stage(_metrics(tuned_ppl=8.0), True, "production", 0.0, holder=holder)
    assert stage is None and "tuned perplexity 8.3 does not beat version v1" in reason
