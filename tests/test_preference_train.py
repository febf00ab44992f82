"""task: preference on the tiny model: DPO, KTO and ORPO train through TRL's trainers, the tuned model's held-out
preference accuracy beats the starting model's on a set it can learn, the reference is the SFT model (never the
policy), and the seed decides the adapter."""

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorapipe.config import EvaluateSection, ModelSection, TrainSection
from lorapipe.data.dataset import ConversationDataset
from lorapipe.data.records import Record
from lorapipe.hardware.plan import PhasePlan, decide_plan, model_size
from lorapipe.hardware.probe import probe
from tests.conftest import QUICKSTART_DATA

# slow: trains (five short runs)
pytestmark = pytest.mark.slow
PHASE = PhasePlan(phase="evaluate", device="cpu", dtype="float32", batch_size=8, max_seq_length=96, reason="test")


def learnable_pairs() -> list[Record]:
    """Pairs a tiny model can learn: the same answer opened by 'Yes.' (chosen) or 'No.' (rejected)."""
    rows = [json.loads(line) for line in QUICKSTART_DATA.read_text().splitlines()[:96]]
    return [Record("pairs.jsonl", i + 1, "", "preference", messages=[{"role": "user", "content": r["prompt"][:120]}],
                   chosen=[{"role": "assistant", "content": "Yes. " + r["completion"][:40]}],
                   rejected=[{"role": "assistant", "content": "No. " + r["completion"][:40]}])
            for i, r in enumerate(rows)]


def train(tmp: Path, model_dir: Path, method: str, seed: int = 7, **extra):
    from lorapipe.backends.hf import HFBackend
    from lorapipe.tasks import get_task

    pairs = learnable_pairs()
    t = TrainSection(backend="hf", device="cpu", max_seq_length=96, method=method, epochs=2, learning_rate=5e-3,
                     effective_batch_size=8, micro_batch_size=4, logging_steps=1, save_steps=1000,
                     output_root=str(tmp), **extra)
    plan = decide_plan(t, probe(str(tmp)), model_size(str(model_dir), task="preference"), task="preference").train
    info = HFBackend().train(get_task("preference"), ModelSection(name_or_path=str(model_dir)), t, seed, plan,
                             ConversationDataset(pairs[:80]), ConversationDataset([]), tmp / "w", tmp / "adapter")
    log = [json.loads(line) for line in (tmp / "adapter" / "training_log.jsonl").read_text().splitlines()]
    return info, log, ConversationDataset(pairs[80:], name="test")


def evaluate(adapter: Path, test: ConversationDataset):
    from lorapipe.tasks import get_task

    return get_task("preference").evaluate(str(adapter), test, PHASE,
                                           EvaluateSection(max_samples=16, generation_samples=2, max_new_tokens=8))


@pytest.fixture(scope="module")
def dpo(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    info, log, test = train(tmp, tiny_model_dir, "dpo")
    return {"info": info, "log": log, "test": test, "adapter": tmp / "adapter", "metrics": evaluate(tmp / "adapter",
                                                                                                    test)}


def test_dpo_starts_at_ln2_with_no_margin_and_learns_the_preference(dpo):
    first = dpo["log"][0]
    # step 1's batch is scored before any update: the policy is the reference
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6) and first["rewards/chosen"] == 0.0
    m = dpo["metrics"]
    assert m.tuned.preference_accuracy > m.base.preference_accuracy and m.tuned.preference_accuracy >= 0.9
    assert m.tuned.reward_margin > 0 and m.tuned.reward_accuracy >= 0.9 and m.tuned_beats_base
    assert m.base.reward_margin is None  # the starting model has no reward against itself
    assert m.samples and {"reference", "rejected", "base", "tuned"} <= set(m.samples[0])
    meta = json.loads((dpo["adapter"] / "lorapipe_adapter.json").read_text())
    assert meta["task"] == "preference" and meta["preference"]["method"] == "dpo"
    assert meta["preference"]["reference"] == "starting_model" and meta["preference"]["beta"] == 0.1
    # throughput counts both sides of every pair, as training cut them, for both epochs
    from lorapipe.data.render import encode
    from lorapipe.models.loading import load_tokenizer

    tok = load_tokenizer(str(dpo["adapter"]))
    sides = sum(len(encode(tok, p.side(side), 96).input_ids) for p in learnable_pairs()[:80]
                for side in ("chosen", "rejected"))
    assert meta["result"]["train_tokens"] == 2 * sides and meta["result"]["tokens_per_second"] > 0


def test_the_same_seed_gives_the_same_adapter(dpo, tiny_model_dir, tmp_path):
    _, log, _ = train(tmp_path, tiny_model_dir, "dpo")
    digest = [hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()
              for folder in (dpo["adapter"], tmp_path / "adapter")]
    losses = [[r["loss"] for r in run if "loss" in r] for run in (log, dpo["log"])]
    assert digest[0] == digest[1] and losses[0] == losses[1] and len(losses[0]) == 20


@pytest.mark.parametrize("method", ["kto", "orpo"])
def test_kto_and_orpo_train_and_beat_the_starting_model(method, tiny_model_dir, tmp_path):
    info, log, test = train(tmp_path, tiny_model_dir, method)
    assert info.steps > 0 and all(math.isfinite(r["loss"]) for r in log if "loss" in r)
    m = evaluate(tmp_path / "adapter", test)
    assert m.tuned.preference_accuracy > m.base.preference_accuracy, (m.base, m.tuned)
    meta = json.loads((tmp_path / "adapter" / "lorapipe_adapter.json").read_text())
    assert meta["preference"]["method"] == method
    assert meta["preference"]["reference"] == (None if method == "orpo" else "starting_model")
    if method == "orpo":  # the padding counted is of what the model saw: each side with its prompt, not the prompt
        from lorapipe.data.render import encode  # batch again (TRL's ORPO batches prompt_input_ids beside them)
        from lorapipe.models.loading import load_tokenizer

        tok = load_tokenizer(str(tmp_path / "adapter"))
        sides = sum(len(encode(tok, p.side(side), 96).input_ids) for p in learnable_pairs()[:80]
                    for side in ("chosen", "rejected"))
        real = meta["padding_waste"]["real_tokens"]
        # 2 epochs; TRL's ORPO tokenizer adds at most a BOS and an EOS to each of the 160 sides
        assert 2 * sides <= real <= 2 * (sides + 2 * 160), (real, 2 * sides)


def test_continuing_an_sft_adapter_keeps_it_as_the_frozen_reference(hf_adapter, tiny_model_dir, tmp_path):
    """The reference of a DPO run that continues an SFT adapter is that adapter, frozen, never the policy and never
    the bare base: at step 1 the loss is ln 2 with no margin (the policy equals the reference), and after training
    the reference's weights are the SFT adapter's, unchanged, while the policy's moved."""
    sft = Path(hf_adapter["adapter"])
    info, log, test = train(tmp_path, tiny_model_dir, "dpo", init_adapter=str(sft))
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and log[0]["rewards/margins"] == pytest.approx(0)
    out = tmp_path / "adapter"
    sft_weights = load_file(str(sft / "adapter_model.safetensors"))
    reference = load_file(str(out / "ref" / "adapter_model.safetensors"))
    policy = load_file(str(out / "adapter_model.safetensors"))
    assert set(reference) == set(sft_weights) == set(policy)
    assert all(torch.equal(reference[k], sft_weights[k]) for k in sft_weights)
    assert any(not torch.equal(policy[k], sft_weights[k]) for k in sft_weights)
    meta = json.loads((out / "lorapipe_adapter.json").read_text())
    assert meta["preference"]["reference"] == "init_adapter"
    # the starting model evaluated is the SFT adapter (the frozen copy), so the tuned model is compared with it
    m = evaluate(out, test)
    assert m.tuned.preference_accuracy > m.base.preference_accuracy


def test_a_dpo_run_killed_mid_way_resumes_to_the_uninterrupted_adapter(dpo, tiny_model_dir, tmp_path):
    """A crash after step 13 of 20 (checkpoints every 5 steps): the same call resumes from checkpoint-10 and ends
    with the uninterrupted run's adapter, bit for bit (weights, optimizer, scheduler, RNG and data order restored)."""
    from transformers import TrainerCallback

    from lorapipe.backends.hf import HFBackend
    from lorapipe.tasks import get_task

    class CrashAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 13:
                raise RuntimeError("simulated crash after step 13")

    pairs = learnable_pairs()
    t = TrainSection(backend="hf", device="cpu", max_seq_length=96, method="dpo", epochs=2, learning_rate=5e-3,
                     effective_batch_size=8, micro_batch_size=4, logging_steps=1, save_steps=5,
                     output_root=str(tmp_path))
    plan = decide_plan(t, probe(str(tmp_path)), model_size(str(tiny_model_dir), task="preference"),
                       task="preference").train
    args = (get_task("preference"), ModelSection(name_or_path=str(tiny_model_dir)), t, 7, plan,
            ConversationDataset(pairs[:80]), ConversationDataset([]), tmp_path / "w", tmp_path / "adapter")
    with pytest.raises(RuntimeError, match="simulated crash"):
        HFBackend().train(*args, extra_callbacks=[CrashAfter()])
    info = HFBackend().train(*args)
    assert info.resumed_from is not None and info.resumed_from.endswith("checkpoint-10")
    resumed = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    reference = load_file(str(dpo["adapter"] / "adapter_model.safetensors"))
    assert set(resumed) == set(reference) and all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_dpo_trains_in_two_data_parallel_processes_to_one_adapter(tiny_model_dir, tmp_path):
    """The train step launches two CPU gloo ranks (torchrun) for a preference run as for SFT: one adapter, the
    effective batch of one process, rank 0's monitor files and plots."""
    from lorapipe.phases.launch import LAUNCH_DIR
    from lorapipe.phases.train_worker import read_statuses
    from steps.train import train_adapter

    pairs = learnable_pairs()
    cfg = TrainSection(backend="hf", device="cpu", processes=2, method="dpo", micro_batch_size=2,
                       effective_batch_size=8, max_seq_length=96, epochs=1, learning_rate=5e-3, warmup_steps=0,
                       logging_steps=1, save_steps=100, output_root=str(tmp_path / "runs"))
    plan = decide_plan(cfg, probe(str(tmp_path)), model_size(str(tiny_model_dir), task="preference"),
                       task="preference").train
    assert plan.world_size == 2 and plan.gradient_accumulation_steps == 2
    folder = train_adapter.entrypoint(train_split=ConversationDataset(pairs[:32]), eval_split=ConversationDataset([]),
                                      training_plan=plan, model=ModelSection(name_or_path=str(tiny_model_dir)),
                                      train=cfg, seed=7)
    adapter = Path(folder.path)
    statuses = read_statuses(adapter.parent / LAUNCH_DIR)
    assert sorted(statuses) == [0, 1] and all(s["ok"] and s["world_size"] == 2 for s in statuses.values())
    meta = json.loads((adapter / "lorapipe_adapter.json").read_text())
    assert meta["task"] == "preference" and meta["world_size"] == 2 and meta["result"]["steps"] == 32 // 8
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert all(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)
    assert {"loss.png", "metrics.jsonl", "training_log.jsonl"} <= {p.name for p in adapter.iterdir()}


def test_a_precomputed_reference_gives_the_same_start_and_the_plan_drops_its_forward(tiny_model_dir, tmp_path):
    """train.preference.precompute_reference: TRL computes the reference's log-probabilities once, before training;
    step 1 is still ln 2 with no margin (the same reference), and the memory model leaves the reference's forward
    out of the training peak."""
    info, log, _ = train(tmp_path, tiny_model_dir, "dpo", preference={"precompute_reference": True})
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and log[0]["rewards/margins"] == pytest.approx(0)
    meta = json.loads((tmp_path / "adapter" / "lorapipe_adapter.json").read_text())
    assert meta["preference"]["precompute_reference"] is True
    terms = {precompute: [t.name for t in decide_plan(
        TrainSection(backend="hf", device="cpu", method="dpo", max_seq_length=96,
                     preference={"precompute_reference": precompute}), probe(str(tmp_path)),
        model_size(str(tiny_model_dir), task="preference"), task="preference").train.memory.terms]
        for precompute in (False, True)}
    assert any(n.startswith("reference forward") for n in terms[False])
    assert not any(n.startswith("reference forward") for n in terms[True])


def test_unpaired_test_rows_are_evaluated_by_ranking_desirable_above_undesirable(dpo):
    """KTO's feedback has no pairs: evaluation ranks the desirable answers' per-token log-probability above the
    undesirable ones' (the share of such combinations) for the starting and the tuned model."""
    from dataclasses import replace

    unpaired = [replace(r, chosen=answer, rejected=None, desirable=good, format="unpaired")
                for r in dpo["test"].records for answer, good in ((r.chosen, True), (r.rejected, False))]
    m = evaluate(dpo["adapter"], ConversationDataset(unpaired, name="test"))
    assert m.tuned.preference_accuracy > m.base.preference_accuracy and m.tuned.preference_accuracy >= 0.9
    assert m.tuned.reward_margin > 0 and m.scored_rows == 16


def test_only_the_judged_answer_is_scored_not_the_prompts_earlier_assistant_turns(tiny_model_dir):
    """A multi-turn prompt's earlier assistant turns belong to the prompt (as TRL's losses have them): the scored
    tokens of a side are its last answer's only."""
    from lorapipe.data.render import encode
    from lorapipe.models.loading import load_model, load_tokenizer
    from lorapipe.tasks.preference import answer_logps

    tok = load_tokenizer(str(tiny_model_dir))
    history = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "a long earlier answer"},
               {"role": "user", "content": "and now?"}]
    rec = Record("p", 1, "", "preference", messages=history, chosen=[{"role": "assistant", "content": "yes."}],
                 rejected=[{"role": "assistant", "content": "no."}])
    (_, n), = answer_logps(load_model(str(tiny_model_dir), "float32", device="cpu"), tok, [rec.side("chosen")], PHASE)
    last_only = encode(tok, Record("p", 1, "", "messages", messages=[{"role": "user", "content": "x"},
                                                                      {"role": "assistant", "content": "yes."}]))
    assert n == sum(last_only.assistant_mask) < sum(encode(tok, rec.side("chosen")).assistant_mask) - 1
