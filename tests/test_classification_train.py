"""task: classification training on the hf backend with real tiny models loaded through the real loading code: LoRA +
the head on a decoder (Llama with a score head), full fine-tuning of an encoder, early stopping, class weights,
the head-only baseline, resume and the merge that keeps the labels."""

import json
import logging
import math
import shutil
from pathlib import Path

import pytest

from lorapipe.config import ModelSection, TrainSection
from lorapipe.data.formats import LabelFields
from lorapipe.data.split import split_records
from lorapipe.data.validation import validate_dataset
from tests.conftest import CLASSIFICATION_DATA

pytestmark = pytest.mark.slow
LABELS = ["general", "sports", "sql"]


@pytest.fixture(scope="module")
def splits():
    out = validate_dataset([str(CLASSIFICATION_DATA)], "classification", label_fields=LabelFields(),
                           run_expectations=False)
    return split_records(out.records, 0.1, 0.2)


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    from lorapipe.models.tiny import build_tiny_decoder_classifier

    return build_tiny_decoder_classifier(tmp_path_factory.mktemp("dec") / "tiny-llama-cls", [CLASSIFICATION_DATA],
                                         num_labels=3)


def _plan(model_dir: Path, t: TrainSection, work: Path, labels: list[str] = LABELS):
    from lorapipe.hardware.plan import decide_plan, model_size
    from lorapipe.hardware.probe import probe

    facts = model_size(str(model_dir), task="classification", num_labels=len(labels))
    plan = decide_plan(t, probe(str(work)), facts, task="classification", num_labels=len(labels)).train
    plan.labels = labels
    return plan


def _train(model_dir, splits, tmp, name="run", labels=LABELS, **train):
    from lorapipe.phases.train_in_process import train_in_process

    train.setdefault("backend", "hf")
    train.setdefault("device", "cpu")
    train.setdefault("head_only_baseline", False)
    t = TrainSection(output_root=str(tmp), **train)
    t.lora.target_modules = "all-linear"
    plan = _plan(model_dir, t, tmp, labels)
    train_split, eval_split, _ = splits
    work, adapter = tmp / name, tmp / name / "adapter"
    info = train_in_process(ModelSection(name_or_path=str(model_dir)), t, 7, plan, train_split, eval_split, work,
                            adapter)
    return info, adapter, json.loads((adapter / "lorapipe_adapter.json").read_text())


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_lora_on_a_decoder_trains_the_adapter_and_the_head_and_merges_with_its_labels(decoder_dir, splits, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    from lorapipe.hardware.plan import PhasePlan
    from lorapipe.phases.merge import merge_adapter

    info, adapter, meta = _train(decoder_dir, splits, tmp_path, method="lora", max_steps=8, learning_rate=1e-2,
                                 micro_batch_size=8, effective_batch_size=8)
    assert info.steps == 8 and meta["task"] == "classification" and meta["labels"] == LABELS
    assert meta["head_modules"] == ["score"] and meta["pad_token_id"] is not None
    weights = _tensors(adapter / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().max()) > 0 for v in lora_b)  # B starts at zero: every one moved
    base = _tensors(decoder_dir / "model.safetensors")
    head = next(v for k, v in weights.items() if k.endswith("score.weight"))
    assert head.shape == (3, base["score.weight"].shape[1]) and not torch.equal(head, base["score.weight"])
    # the base stays as it was: the adapter folder holds no base weight but the head's trained copy
    assert not any(k.endswith(("q_proj.weight", "embed_tokens.weight")) for k in weights)

    out = tmp_path / "merged"
    check = merge_adapter(str(adapter), str(out), splits[2],
                          PhasePlan(phase="merge", device="cpu", dtype="float32", batch_size=1, max_seq_length=128,
                                    reason="test"))
    assert check.passed and check.rows_checked == 4 and check.greedy_agreement == 1.0
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    assert merged.config.id2label == dict(enumerate(LABELS)) and merged.config.pad_token_id is not None
    merged_state = merged.state_dict()
    assert torch.equal(merged_state["score.weight"], head)  # the trained head, not the base's
    # LoRA folded in: the merged q_proj differs from the base's
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged_state[key], base[key])
    assert not (out / "generation_config.json").exists() and not (out / "Modelfile").exists()


def test_full_fine_tuning_of_an_encoder_and_the_head_only_baseline(tiny_encoder_dir, splits, tmp_path):
    import torch

    info, adapter, meta = _train(tiny_encoder_dir, splits, tmp_path, method="full", max_steps=6, learning_rate=3e-3,
                                 micro_batch_size=16, effective_batch_size=16, head_only_baseline=True)
    assert meta["method"] == "full" and (adapter / "model.safetensors").is_file()
    config = json.loads((adapter / "config.json").read_text())
    assert config["id2label"] == {"0": "general", "1": "sports", "2": "sql"}
    trained, base = _tensors(adapter / "model.safetensors"), _tensors(tiny_encoder_dir / "model.safetensors")
    key = next(k for k in base if k.endswith("attention.self.query.weight"))
    assert not torch.equal(trained["bert." + key if not key.startswith("bert.") else key], base[key])
    # the baseline: the head alone, its weights and nothing else; the same schedule
    head = _tensors(adapter / "baseline_head" / "head.safetensors")
    assert set(head) == {"classifier.weight", "classifier.bias"}
    assert meta["baseline_head"]["steps"] == 6 and not torch.equal(head["classifier.weight"],
                                                                  trained["classifier.weight"])


def test_early_stopping_stops_after_patience_evaluations_without_improvement(tiny_encoder_dir, splits, tmp_path):
    # a learning rate too small to change a prediction: the first evaluation is the best and never beaten
    common = dict(method="lora", learning_rate=1e-9, eval_steps=1, save_steps=1, max_steps=20, micro_batch_size=16,
                  effective_batch_size=16, load_best_model_at_end=True, lr_scheduler="constant", warmup_steps=0)
    info, _, meta = _train(tiny_encoder_dir, splits, tmp_path, "stops", early_stopping_patience=2, **common)
    assert info.steps == 3 and meta["stopped_early"] and meta["max_steps"] == 20
    assert meta["best"]["step"] == 1 and meta["best"]["metric"] == "macro_f1" and meta["best"]["loaded"]
    # without early stopping the same run goes to max_steps
    info, _, meta = _train(tiny_encoder_dir, splits, tmp_path, "runs-on", **{**common, "max_steps": 5})
    assert info.steps == 5 and not meta["stopped_early"]


def test_balanced_class_weights_weigh_the_loss_by_inverse_frequency(tiny_encoder_dir, splits, tmp_path):
    import torch

    from lorapipe.tasks.classification.model import balanced_weights, weighted_loss

    # n / (k x n_c): 8 rows, 2 classes of 6 and 2
    assert balanced_weights({"a": 6, "b": 2}) == [8 / 12, 8 / 4]
    loss = weighted_loss([8 / 12, 2.0])({"logits": torch.tensor([[2.0, 0.0], [0.0, 0.0]])}, torch.tensor([0, 1]))
    first, second = -math.log(math.exp(2) / (math.exp(2) + 1)), math.log(2)
    # torch's weighted mean: sum(w_y x loss) / sum(w_y)
    assert float(loss) == pytest.approx((8 / 12 * first + 2 * second) / (8 / 12 + 2), rel=1e-6)
    _, _, meta = _train(tiny_encoder_dir, splits, tmp_path, "weighted", method="full", max_steps=2,
                        micro_batch_size=16, effective_batch_size=16, class_weights="balanced")
    counts = meta["train_class_counts"]
    n = sum(counts.values())
    assert meta["class_weights"] == pytest.approx([n / (3 * counts[label]) for label in LABELS])


def test_a_run_cut_short_resumes_from_its_checkpoint_to_the_same_weights(tiny_encoder_dir, splits, tmp_path):
    import torch

    common = dict(method="lora", max_steps=6, save_steps=3, micro_batch_size=16, effective_batch_size=16,
                  learning_rate=5e-3)
    _, whole, _ = _train(tiny_encoder_dir, splits, tmp_path, "whole", **common)
    _train(tiny_encoder_dir, splits, tmp_path, "cut", **common)
    # as if the run had died after step 3: its last checkpoint and the adapter gone
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "checkpoint-6")
    shutil.rmtree(tmp_path / "cut" / "adapter")
    info, resumed, _ = _train(tiny_encoder_dir, splits, tmp_path, "cut", **common)
    assert info.resumed_from.endswith("checkpoint-3")
    a, b = _tensors(whole / "adapter_model.safetensors"), _tensors(resumed / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("class_weights", ["none", "balanced"])
def test_gradient_accumulation_trains_the_same_loss_as_one_big_batch(tiny_encoder_dir, splits, tmp_path, class_weights):
    common = dict(method="lora", max_steps=3, learning_rate=5e-3, class_weights=class_weights, effective_batch_size=16)
    whole, _, _ = _train(tiny_encoder_dir, splits, tmp_path, "one-batch", micro_batch_size=16, **common)
    accumulated, _, _ = _train(tiny_encoder_dir, splits, tmp_path, "accumulated", micro_batch_size=4, **common)
    # the same 16 rows per optimizer step; dropout draws differ with the micro-batch shape, nothing else: a loss
    # multiplied by the 4 accumulation steps (a classifier's forward takes **kwargs, which the Trainer reads as
    # "divides by itself") would be 4x
    assert accumulated.train_loss == pytest.approx(whole.train_loss, rel=0.15)


def test_weights_the_checkpoint_lacks_are_trained_and_saved_not_drawn_again_at_each_load(tiny_encoder_dir, splits,
                                                                                         tmp_path):
    """A checkpoint saved from a masked-LM head has no pooler (bert-base's MLM exports): the pooler starts random.
    It must be trained and saved with the adapter, or evaluation, merge and predict would each draw another."""
    import torch
    from safetensors.torch import load_file, save_file

    from lorapipe.hardware.plan import PhasePlan
    from lorapipe.tasks.classification import load_tuned

    mlm = tmp_path / "no-pooler"
    shutil.copytree(tiny_encoder_dir, mlm)
    weights = load_file(str(mlm / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if "pooler" not in k}, str(mlm / "model.safetensors"))
    _, adapter, meta = _train(mlm, splits, tmp_path, method="lora", max_steps=2, micro_batch_size=16,
                              effective_batch_size=16, head_only_baseline=True)
    assert meta["head_modules"] == ["classifier", "bert.pooler.dense"]
    assert any("pooler" in k for k in _tensors(adapter / "baseline_head" / "head.safetensors"))
    phase = PhasePlan(phase="evaluate", device="cpu", dtype="float32", batch_size=4, max_seq_length=128, reason="test")
    from lorapipe.models.loading import load_tokenizer

    enc = load_tokenizer(str(adapter))(["who won the game"], return_tensors="pt")
    logits = [load_tuned(str(adapter), meta, phase).eval()(**enc).logits for _ in range(2)]
    assert torch.equal(logits[0], logits[1])


def test_two_data_parallel_ranks_train_one_classifier_and_its_baseline(tiny_encoder_dir, splits, tmp_path):
    """The pipeline's train step over two CPU gloo processes (real ranks): the classifier and the head-only
    baseline train in both (the process group needs every rank), one writes."""
    from lorapipe.hardware.plan import decide_plan, model_size
    from lorapipe.hardware.probe import probe
    from steps.train import train_adapter

    t = TrainSection(backend="hf", device="cpu", processes=2, method="lora", micro_batch_size=4,
                     effective_batch_size=16, max_steps=3, learning_rate=5e-3, save_steps=10,
                     output_root=str(tmp_path / "runs"), head_only_baseline=True, lora={"target_modules": "all-linear"})
    facts = model_size(str(tiny_encoder_dir), task="classification", num_labels=3)
    plan = decide_plan(t, probe(str(tmp_path)), facts, task="classification", num_labels=3).train
    plan.labels = LABELS
    assert plan.world_size == 2
    train_split, eval_split, _ = splits
    folder = train_adapter.entrypoint(train_split=train_split, eval_split=eval_split, training_plan=plan,
                                      model=ModelSection(name_or_path=str(tiny_encoder_dir)), train=t, seed=7)
    meta = json.loads((Path(folder.path) / "lorapipe_adapter.json").read_text())
    assert meta["result"]["world_size"] == 2 and meta["result"]["steps"] == 3 and meta["labels"] == LABELS
    assert meta["baseline_head"]["steps"] == 3
    assert set(_tensors(Path(folder.path) / "baseline_head" / "head.safetensors")) == {"classifier.weight",
                                                                                     "classifier.bias"}


def test_cuda_out_of_memory_in_the_first_steps_halves_the_micro_batch(tiny_encoder_dir, splits, tmp_path):
    """No GPU here: the error is raised by a callback at the end of step 1 of the first attempt, where a real one
    would surface from an early step's forward or backward."""
    import torch
    from transformers import TrainerCallback

    from lorapipe.phases.train_in_process import train_in_process

    class FakeOOM(TrainerCallback):
        attempts: list = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.attempts.append((args.per_device_train_batch_size, args.gradient_accumulation_steps))

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1 and len(self.attempts) == 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    oom = FakeOOM()
    FakeOOM.attempts = []
    t = TrainSection(backend="hf", device="cpu", method="lora", micro_batch_size=8, effective_batch_size=16,
                     max_steps=2, save_steps=100, output_root=str(tmp_path), head_only_baseline=False)
    plan = _plan(tiny_encoder_dir, t, tmp_path)
    train_split, eval_split, _ = splits
    # the SFT default (Llama's projection names) on an encoder: named, with the layers it has
    with pytest.raises(ValueError,
                       match="matches no layer of .*named .*query.*set train.lora.target_modules: all-linear"):
        train_in_process(ModelSection(name_or_path=str(tiny_encoder_dir)), t, 7, plan, train_split, eval_split,
                         tmp_path / "bad", tmp_path / "bad" / "adapter")
    t.lora.target_modules = "all-linear"
    info = train_in_process(ModelSection(name_or_path=str(tiny_encoder_dir)), t, 7, plan, train_split, eval_split,
                            tmp_path / "w", tmp_path / "w" / "adapter", extra_callbacks=[oom])
    assert oom.attempts == [(8, 2), (4, 4)] and info.steps == 2
    meta = json.loads((tmp_path / "w" / "adapter" / "lorapipe_adapter.json").read_text())
    assert [(b["from"], b["to"], b["step"]) for b in meta["oom_backoff"]] == [(8, 4, 1)]
    assert meta["plan"]["effective_batch_size"] == 16


def test_qlora_keeps_the_head_unquantised_and_the_untuned_baseline_falls_back_to_the_majority(tiny_encoder_dir,
                                                                                              splits, tmp_path,
                                                                                              caplog):
    """QLoRA = LoRA + an NF4 base (bitsandbytes quantises on this CPU): the head stays a full-precision layer that
    trains and saves in fp32; a quantised base trains through adapters only, so the head-only baseline is skipped
    with the reason and evaluation's untuned baseline is the majority class."""
    import torch

    from lorapipe.hardware.plan import PhasePlan
    from lorapipe.phases.evaluate import evaluate_adapter
    from lorapipe.phases.merge import merge_adapter

    pytest.importorskip("bitsandbytes")
    info, adapter, meta = _train(tiny_encoder_dir, splits, tmp_path, method="lora", quantization="nf4", max_steps=3,
                                 micro_batch_size=16, effective_batch_size=16, head_only_baseline=True)
    assert meta["plan"]["quantization"] == "nf4" and "majority class" in meta["baseline_head"]["skipped"]
    head = {k: v for k, v in _tensors(adapter / "adapter_model.safetensors").items() if "classifier" in k}
    assert {tuple(v.shape) for v in head.values()} == {(3, 64), (3,)} and all(v.dtype == torch.float32
                                                                           for v in head.values())
    phase = PhasePlan(phase="evaluate", device="cpu", dtype="float32", batch_size=32, max_seq_length=128, reason="test")
    with caplog.at_level(logging.INFO, logger="lorapipe"):
        metrics = evaluate_adapter(str(adapter), splits[2], phase)
    assert metrics.classification.untuned == "majority" and set(metrics.classification.reports) == {"majority",
                                                                                                    "tuned"}
    # the user reads the baselines beside the tuned model, then its per-label report and confusion matrix
    said = [r.getMessage() for r in caplog.records]
    table = next(i for i, line in enumerate(said) if line.split()[:3] == ["model", "accuracy", "macro"])
    assert [line.split()[0] for line in said[table + 1:table + 3]] == ["majority", "tuned"]
    tuned = metrics.classification.reports["tuned"]
    assert f"{tuned['accuracy']:.3f}" in said[table + 2]
    assert any(line.startswith("true \\ predicted") for line in said[table:])
    check = merge_adapter(str(adapter), str(tmp_path / "merged"), splits[2],
                          PhasePlan(phase="merge", device="cpu", dtype="float32", batch_size=1, max_seq_length=128,
                                    reason="test"))
    assert check.passed


def test_text_pairs_train_evaluate_merge_and_predict(tiny_encoder_dir, tmp_path):
    """Pairs (NLI, query/document): [CLS] text [SEP] pair [SEP] with token types, from validation to predict."""
    import random

    from lorapipe.hardware.plan import PhasePlan
    from lorapipe.phases.evaluate import evaluate_adapter
    from lorapipe.phases.merge import merge_adapter
    from lorapipe.phases.predict import (
        classifier_settings,
        classify,
        load_for_inference,
    )

    rows = [json.loads(line) for line in CLASSIFICATION_DATA.read_text().splitlines()]
    rng = random.Random(0)
    pairs = []
    for row in rows[:240]:
        other = rng.choice(rows)
        pairs.append({"query": row["text"], "document": other["text"],
                      "same_source": "same" if other["label"] == row["label"] else "different"})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    fields = LabelFields.from_config("query", "document", "same_source", None)
    out = validate_dataset([str(path)], "classification", label_fields=fields, run_expectations=False)
    assert out.report.passed and out.report.classification.text_pair
    pair_splits = split_records(out.records, 0.1, 0.2)
    _, adapter, meta = _train(tiny_encoder_dir, pair_splits, tmp_path, labels=["different", "same"], method="full",
                              max_steps=4, micro_batch_size=16, effective_batch_size=16, max_seq_length=128)
    assert meta["text_pair"] and meta["labels"] == ["different", "same"]
    phase = PhasePlan(phase="evaluate", device="cpu", dtype="float32", batch_size=16, max_seq_length=128, reason="test")
    metrics = evaluate_adapter(str(adapter), pair_splits[2], phase)
    assert metrics.test_rows == len(pair_splits[2]) and metrics.samples[0]["text_pair"] is not None
    merged = tmp_path / "merged"
    assert merge_adapter(str(adapter), str(merged), pair_splits[2],
                         PhasePlan(phase="merge", device="cpu", dtype="float32", batch_size=1, max_seq_length=128,
                                   reason="t")).passed
    assert classifier_settings(merged) == {"max_length": 128, "text_pair": True}
    model, tokenizer, _ = load_for_inference(merged, "cpu", "float32")
    answer = classify(model, tokenizer, "who won the game", "how many rows are there")
    assert answer["label"] in ("different", "same") and answer["text_pair"] == "how many rows are there"


def test_qlora_keeps_a_pooler_the_checkpoint_lacks_unquantised(tiny_encoder_dir, splits, tmp_path):
    """bert-base's MLM exports have no pooler: under QLoRA it is trained in full, so it must load unquantised."""
    from safetensors.torch import load_file, save_file

    pytest.importorskip("bitsandbytes")
    mlm = tmp_path / "no-pooler"
    shutil.copytree(tiny_encoder_dir, mlm)
    weights = load_file(str(mlm / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if "pooler" not in k}, str(mlm / "model.safetensors"))
    info, adapter, meta = _train(mlm, splits, tmp_path, method="lora", quantization="nf4", max_steps=2,
                                 micro_batch_size=16, effective_batch_size=16)
    assert info.steps == 2 and "bert.pooler.dense" in meta["head_modules"]
    saved = _tensors(adapter / "adapter_model.safetensors")
    assert any("pooler.dense" in k and v.shape == (64, 64) for k, v in saved.items())
