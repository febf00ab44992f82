"""task: classification in the memory model, the plan and the size guide: a sequence classifier's parameters from
public config.json values (BERT, RoBERTa, Llama), the encoder and full-fine-tuning activation terms checked against
what torch's autograd really saves (saved-tensor hooks on tiny random models), and the plan's backend choice and
refusals. Machines are faked probes (plain data); no weights are read."""

import pytest
import torch

from lorapipe.catalog import BACKENDS, backends_for
from lorapipe.config import EvaluateSection, TrainSection
from lorapipe.hardware import facts
from lorapipe.hardware import memory as mem
from lorapipe.hardware.facts import facts_from_config
from lorapipe.hardware.memory import MemoryInputs, estimate
from lorapipe.hardware.plan import PlanError, TrainingPlan, decide_plan
from lorapipe.hardware.size_guide import format_size_guide, size_guide
from tests.model_facts import CONFIGS, autograd_saved_bytes
from tests.test_plan import ALL, make_probe

NO_MLX = {k: v for k, v in ALL.items() if k not in ("unsloth", "mlx", "mlx_lm")}
GIB = 2**30


def cls_facts(name: str, num_labels: int = 2) -> facts.ModelFacts:
    from transformers import AutoConfig

    return facts_from_config(AutoConfig.from_pretrained(str(CONFIGS / f"{name}.json")), source=name,
                             task="classification", num_labels=num_labels)


def term(est, phase, name):
    return next(t.bytes for t in est.terms if t.phase == phase and t.name == name)


def classify(**kw) -> TrainSection:
    return TrainSection(**{"max_seq_length": 128, **kw})


# ------------------------------------------------------------------------------------------------------ facts
def test_encoder_parameter_counts_match_the_published_sizes():
    base = cls_facts("bert-base-uncased")
    assert base.block == "encoder" and base.counted == "meta" and "lm_head" not in base.parameter_counts
    # BertModel with its pooler (the published 110M), and a 2-label classifier: 768 x 2 + 2
    assert base.total_parameters - base.classifier_parameters == 109_482_240
    assert base.classifier_parameters == 1_538
    assert base.parameter_counts["head"] == 768 * 768 + 768 + 1_538  # pooler + classifier
    large = cls_facts("bert-large-uncased", num_labels=3)
    assert large.total_parameters - large.classifier_parameters == 335_141_888
    assert large.classifier_parameters == 1024 * 3 + 3
    assert (large.layers, large.heads, large.hidden_size, large.intermediate_size) == (24, 16, 1024, 4096)
    # RoBERTa's classifier has no pooler: a dense + out_proj head (RobertaModel with its pooler is 124,645,632)
    roberta = cls_facts("roberta-base")
    assert roberta.total_parameters == 124_645_632 - (768 * 768 + 768) + (768 * 768 + 768 + 768 * 2 + 2)
    assert roberta.classifier_parameters == roberta.parameter_counts["head"]
    # BERT's three `dense` linears are told apart by their path in the layer; PEFT's suffix match still finds them
    names = [s.name for s in base.linears]
    assert names == ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
    assert len(mem.target_shapes(base, ["dense"])) == 3 and len(mem.target_shapes(base, ["query", "value"])) == 2


def test_a_decoder_classifier_by_formula_agrees_with_the_meta_device():
    from transformers import AutoConfig

    for name in ("llama-3.2-1b", "mistral-7b"):
        cfg = AutoConfig.from_pretrained(str(CONFIGS / f"{name}.json"))
        by_formula = facts_from_config(cfg, task="classification", num_labels=3)
        on_meta = facts.count_on_meta(cfg, task="classification", num_labels=3)
        assert by_formula.parameter_counts == on_meta.parameter_counts, name
        assert by_formula.classifier_parameters == on_meta.classifier_parameters == cfg.hidden_size * 3
        assert by_formula.block == on_meta.block == "decoder"
    # the classifier drops the vocabulary-wide lm_head: the 8B is 7.5B as a classifier
    sft, cls = facts_from_config(AutoConfig.from_pretrained(str(CONFIGS / "llama-3.1-8b.json"))), cls_facts(
        "llama-3.1-8b")
    assert sft.total_parameters - cls.total_parameters == 128256 * 4096 - 4096 * 2


# ------------------------------------------------------------------------------------------------ activations
H, INTER, HEADS = 96, 160, 4


def _config(arch, layers, hidden_dropout=0.0, attention_dropout=0.0, attn="sdpa"):
    from transformers import BertConfig, LlamaConfig

    if arch == "bert":
        return BertConfig(hidden_size=H, intermediate_size=INTER, num_hidden_layers=layers, num_attention_heads=HEADS,
                          vocab_size=300, hidden_dropout_prob=hidden_dropout, num_labels=3,
                          attention_probs_dropout_prob=attention_dropout, attn_implementation=attn)
    return LlamaConfig(hidden_size=H, intermediate_size=INTER, num_hidden_layers=layers, num_attention_heads=HEADS,
                       num_key_value_heads=2, head_dim=32, vocab_size=300, num_labels=3, pad_token_id=0,
                       attn_implementation=attn)


def _saved_bytes(cfg, full, dtype, targets, batch, seq):
    """What autograd saves in one training forward of the classifier: LoRA on a model held in `dtype` (as the hf
    backend loads it), or full fine-tuning of fp32 weights under autocast when `dtype` is 16-bit."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg)
    autocast = full and dtype != torch.float32
    if not autocast:
        model = model.to(dtype)
    if not full:
        model = get_peft_model(model, LoraConfig(r=8, target_modules=targets, task_type=TaskType.SEQ_CLS))
    model.train()
    ids = torch.randint(1, 300, (batch, seq))
    labels = torch.randint(0, 3, (batch,))

    def forward():
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            model(input_ids=ids, labels=labels)

    return autograd_saved_bytes(model, forward)


def _per_layer(arch, full, dtype, targets=None, seq=16, **cfg_kw):
    """(bytes per token, bytes per layer not per token) of one layer: three layers less one, at two batch sizes."""
    diff = {b: _saved_bytes(_config(arch, 3, **cfg_kw), full, dtype, targets, b, seq)
            - _saved_bytes(_config(arch, 1, **cfg_kw), full, dtype, targets, b, seq) for b in (2, 4)}
    per_token = (diff[4] - diff[2]) / 2 / (2 * seq)
    return per_token, diff[2] / 2 - per_token * 2 * seq


def _predicted(arch, full, dtype, targets=None, seq=16, **cfg_kw):
    f = facts_from_config(_config(arch, 1, **cfg_kw), task="classification", num_labels=3)
    x = MemoryInputs(dtype=str(dtype).split(".")[1], lora_r=8, lora_targets=targets or "all-linear", seq_len=seq,
                     full_finetune=full, task="classification", num_labels=3, attn_implementation=cfg_kw.get("attn"))
    return f, mem._activation_bytes_per_token_layer(f, x)[0]


@pytest.mark.parametrize("full, dtype, targets, cfg_kw", [
    (False, torch.float32, "all-linear", {}),
    (False, torch.float32, ["query", "value"], {}),
    (False, torch.float32, ["dense"], {}),
    (False, torch.bfloat16, "all-linear", {}),
    (False, torch.bfloat16, ["query", "value"], {"hidden_dropout": 0.1}),
    (True, torch.float32, None, {"hidden_dropout": 0.1}),
    (True, torch.bfloat16, None, {}),
    (True, torch.bfloat16, None, {"hidden_dropout": 0.1, "attention_dropout": 0.1}),
    (False, torch.float32, "all-linear", {"hidden_dropout": 0.1, "attention_dropout": 0.1}),
    (True, torch.float32, None, {"attn": "eager", "hidden_dropout": 0.1, "attention_dropout": 0.1}),
    (False, torch.bfloat16, "all-linear", {"attn": "eager"}),
    (False, torch.float32, ["query", "value"], {"attn": "eager"}),
])
def test_encoder_activation_term_is_what_autograd_saves(full, dtype, targets, cfg_kw):
    # on the CPU: dropout keeps its noise in dtype, and attention dropout sends sdpa to its math path
    per_token, per_layer = _per_layer("bert", full, dtype, targets, **cfg_kw)
    f, predicted = _predicted("bert", full, dtype, targets, **cfg_kw)
    assert predicted == per_token
    # autocast's 16-bit copy of each linear weight, held until backward: the "16-bit weight copies" term
    copies = 2 * sum(s.in_features * s.out_features for s in f.linears) if full and dtype != torch.float32 else 0
    assert per_layer == copies


def test_attention_dropout_on_the_cpu_with_16_bit_lora_is_close():
    # the math path's fp32 copies are counted as 3(4-a)h; with 16-bit LoRA two-thirds of that is shared
    per_token, _ = _per_layer("bert", False, torch.bfloat16, "all-linear", hidden_dropout=0.1, attention_dropout=0.1)
    _, predicted = _predicted("bert", False, torch.bfloat16, "all-linear", hidden_dropout=0.1, attention_dropout=0.1)
    assert per_token <= predicted <= 1.05 * per_token


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_fine_tuning_of_a_decoder_is_what_autograd_saves(dtype):
    per_token, per_layer = _per_layer("llama", True, dtype)
    f, predicted = _predicted("llama", True, dtype)
    assert predicted == per_token
    assert per_layer == (2 * sum(s.in_features * s.out_features for s in f.linears) if dtype != torch.float32 else 0)


@pytest.mark.parametrize("arch, full", [("bert", False), ("bert", True), ("llama", False), ("llama", True)])
def test_the_whole_classifier_s_activations_are_bounded_by_the_terms(arch, full):
    """Layers, embeddings, final norm, head and logits together (fp32 on the CPU, as the plan trains there)."""
    batch, seq, layers = 4, 32, 2
    measured = _saved_bytes(_config(arch, layers, hidden_dropout=0.1), full, torch.float32, "all-linear", batch, seq)
    f = facts_from_config(_config(arch, layers, hidden_dropout=0.1), task="classification", num_labels=3)
    est = estimate(f, MemoryInputs(dtype="float32", micro_batch_size=batch, seq_len=seq, lora_r=8, full_finetune=full,
                                   task="classification", num_labels=3))
    predicted = sum(t.bytes for t in est.terms if t.phase == "train" and t.name.startswith(("activations", "logits")))
    assert measured <= predicted <= 1.15 * measured


# ------------------------------------------------------------------------------------------------------ terms
def test_a_classifier_has_no_vocabulary_wide_logits_and_no_kv_cache():
    f = cls_facts("llama-3.1-8b", num_labels=4)
    x = MemoryInputs(device="cuda", dtype="bfloat16", quantization="nf4", seq_len=512, micro_batch_size=4,
                     eval_batch_size=8, task="classification", num_labels=4)
    est = estimate(f, x)
    assert term(est, "train", "logits and loss") == 4 * 512 * 4 * (2 + 2.5 * 4)  # the score head runs at every token
    assert "KV cache" not in {t.name for t in est.terms if t.phase == "eval"}
    assert term(est, "eval", "logits and loss") == 8 * 512 * 4 * (2 + 8)
    # LoRA + a trained copy of the head (PEFT modules_to_save), in fp32, with its gradients and optimizer state
    lora = mem.lora_parameters(f, 16, "all-linear")
    assert term(est, "train", "head (trainable copy)") == term(est, "train", "head gradients") == 4096 * 4 * 4
    assert est.trainable_parameters == lora + 4096 * 4
    assert term(est, "train", "optimizer state") == 8 * (lora + 4096 * 4)
    # the QLoRA base keeps its embeddings, norms and head unquantised; there is no lm_head to keep
    other = f.total_parameters - f.layer_linear_parameters
    assert term(est, "train", "base weights (embeddings, norms, lm_head)") == 4 * other
    encoder = estimate(cls_facts("bert-base-uncased"),
                       MemoryInputs(device="cuda", dtype="bfloat16", micro_batch_size=32, seq_len=128,
                                    task="classification"))
    assert term(encoder, "train", "logits and loss") == 32 * 2 * (2 + 10)  # pooled: one row of logits per row


def test_full_fine_tuning_holds_fp32_weights_gradients_and_adamw_state():
    f = cls_facts("bert-base-uncased")
    n = f.total_parameters
    bf16 = estimate(f, MemoryInputs(device="cuda", dtype="bfloat16", seq_len=128, micro_batch_size=32,
                                    task="classification", full_finetune=True))
    assert term(bf16, "train", "base weights") == term(bf16, "train", "gradients") == 4 * n
    assert term(bf16, "train", "optimizer state") == 8 * n
    linear = f.parameter_counts["attention"] + f.parameter_counts["mlp"] + f.parameter_counts["head"]
    assert term(bf16, "train", "16-bit weight copies (autocast)") == 2 * linear
    assert bf16.trainable_parameters == n and "LoRA weights" not in {t.name for t in bf16.terms}
    fp32 = estimate(f, MemoryInputs(dtype="float32", task="classification", full_finetune=True))
    assert "16-bit weight copies (autocast)" not in {t.name for t in fp32.terms}
    # nothing to merge: the trained model is copied
    assert term(bf16, "merge", "16-bit trained model (nothing to merge)") == 2 * n
    with pytest.raises(ValueError, match="quantization must be none"):
        estimate(f, MemoryInputs(quantization="nf4", task="classification", full_finetune=True))


def test_facts_counted_for_another_task_are_refused():
    f = cls_facts("bert-base-uncased")
    with pytest.raises(ValueError, match="task sft"):
        estimate(f, MemoryInputs())
    with pytest.raises(ValueError, match="model_size"):
        decide_plan(classify(backend="hf"), make_probe(cuda_gib=24, packages=NO_MLX), f)


# ------------------------------------------------------------------------------------------------------- plan
@pytest.mark.parametrize("probe", [make_probe(cuda_gib=24), make_probe(apple=True, ram_gib=16)])
def test_auto_skips_backends_that_train_causal_lms_only(probe):
    # unsloth on CUDA and mlx on a Mac are installed and preferred for sft; a classifier trains with hf
    plan = decide_plan(classify(), probe, cls_facts("bert-base-uncased", 3), task="classification", num_labels=3)
    t = plan.train
    assert t.backend == "hf" and (t.task, t.method, t.num_labels) == ("classification", "lora", 3)
    assert "cannot train task classification" in t.reasons[0]
    assert any("sequence classifier with 3 labels" in r for r in t.reasons)
    assert "KV cache" not in {m.name for m in plan.evaluate.memory_terms}


@pytest.mark.parametrize("backend", ["unsloth", "mlx"])
def test_a_backend_without_the_task_is_refused_with_the_fix(backend):
    probe = make_probe(apple=True, ram_gib=64) if backend == "mlx" else make_probe(cuda_gib=24)
    with pytest.raises(PlanError) as err:
        decide_plan(classify(backend=backend), probe, cls_facts("bert-base-uncased"), task="classification")
    line = next(p for p in err.value.problems if "task classification" in p)
    assert line.startswith(f"train.backend={backend} cannot train task classification")
    assert "causal LMs" in line and line.endswith("set train.backend: hf or auto")


def test_full_fine_tuning_plans_on_hf_and_is_refused_elsewhere():
    catalog = {name: (spec.tasks, spec.methods) for name, spec in BACKENDS.items()}
    assert catalog["hf"] == (("sft", "classification", "preference"), ("lora", "full", "dpo", "kto", "orpo"))
    assert catalog["unsloth"] == (("sft", "preference"), ("lora", "dpo", "kto", "orpo"))
    assert catalog["mlx"] == (("sft", "preference"), ("lora", "dpo", "orpo"))
    assert backends_for("classification", "full") == ["hf"]
    plan = decide_plan(classify(method="full", profile="conservative"), make_probe(cuda_gib=24, packages=NO_MLX),
                       cls_facts("bert-base-uncased"), task="classification", user_set={"train.profile"})
    # the profile's 4-bit choice does not apply: full fine-tuning trains every weight
    assert (plan.train.method, plan.train.quantization) == ("full", "none")
    assert (plan.train.dtype, plan.train.load_dtype) == ("bfloat16", "float32")  # fp32 weights, bf16 autocast
    assert plan.train.memory.trainable_parameters == cls_facts("bert-base-uncased").total_parameters
    assert any("train.method full: every weight trained" in r for r in plan.train.reasons)
    assert plan.merge.memory_terms[0].name == "16-bit trained model (nothing to merge)"
    with pytest.raises(PlanError, match="train.backend=unsloth cannot train task classification with train.method"):
        decide_plan(classify(method="full", backend="unsloth"), make_probe(cuda_gib=24), cls_facts("bert-base-uncased"),
                    task="classification")


def test_full_fine_tuning_that_does_not_fit_names_lora_as_the_fix():
    with pytest.raises(PlanError) as err:
        decide_plan(classify(method="full", backend="hf", max_seq_length=512, micro_batch_size=1),
                    make_probe(cuda_gib=24, packages=NO_MLX), cls_facts("llama-3.1-8b"), task="classification")
    msg = str(err.value)
    assert "train.method full needs" in msg and "lora fits at" in msg
    assert "train.quantization" not in msg  # full fine-tuning cannot be quantised: not offered


def test_sft_with_full_fine_tuning_is_refused_by_the_plan_too():
    from tests.model_facts import tiny_facts

    with pytest.raises(PlanError, match="train.method full is for task: classification"):
        decide_plan(TrainSection(method="full", backend="hf", max_seq_length=128), make_probe(ram_gib=24,
                    packages=NO_MLX), tiny_facts())


def test_a_training_plan_stored_before_tasks_still_loads():
    plan = decide_plan(classify(backend="hf"), make_probe(cuda_gib=24, packages=NO_MLX), cls_facts("bert-base-uncased"),
                       EvaluateSection(), task="classification").train
    old = plan.model_dump(mode="json")
    for key in ("task", "method", "num_labels"):
        old.pop(key)
    again = TrainingPlan.model_validate(old)
    assert (again.task, again.method, again.num_labels) == ("sft", "lora", None)


# ------------------------------------------------------------------------------------------------- size guide
def test_size_guide_says_what_fits_from_the_memory_model():
    models = {"bert-base-uncased": cls_facts("bert-base-uncased"), "llama-3.1-8b": cls_facts("llama-3.1-8b")}
    rows = size_guide(models, task="classification", seq_len=128, micro_batch_size=32)
    by = {(r["model"], r["method"]): r for r in rows}
    assert {m for _, m in by} == {"full", "lora", "qlora"}
    bert_full = by["bert-base-uncased", "full"]
    assert bert_full["fits"][8] == "yes" and bert_full["train_peak_gib"] <= 8 * 0.9  # full FT of BERT-base on 8 GB
    assert bert_full["trainable_parameters"] == bert_full["parameters"]
    assert all(v == "no" for v in by["llama-3.1-8b", "full"]["fits"].values())  # 8B full FT: not even 80 GB
    assert by["llama-3.1-8b", "full"]["train_peak_gib"] > 80
    # an 8B QLoRA classifier fits 24 GB: as set at seq 512 x 1, with gradient checkpointing at seq 512 x 4
    at_one = size_guide({"8b": models["llama-3.1-8b"]}, task="classification", seq_len=512, micro_batch_size=1,
                        methods=["qlora"])[0]
    assert at_one["fits"][24] == "yes" and at_one["fits"][16] == "yes"
    at_four = size_guide({"8b": models["llama-3.1-8b"]}, task="classification", seq_len=512, micro_batch_size=4,
                         methods=["qlora"])[0]
    assert at_four["fits"][24] == "gradient checkpointing"
    lines = format_size_guide(rows)
    assert "task classification, seq 128 x micro-batch 32" in lines[0] and "90%" in lines[0]
    assert lines[1].split()[-10:] == ["8", "GiB", "16", "GiB", "24", "GiB", "48", "GiB", "80", "GiB"]
    assert len(lines) == 2 + len(rows)
    assert any(line.startswith("llama-3.1-8b") and " full " in line and line.rstrip().endswith("-") for line in lines)


def test_size_guide_for_sft_compares_lora_and_qlora():
    from tests.model_facts import facts

    rows = size_guide({"llama-3.1-8b": facts("llama-3.1-8b")}, seq_len=1024, micro_batch_size=1)
    assert [r["method"] for r in rows] == ["lora", "qlora"]
    assert rows[1]["train_peak_gib"] < rows[0]["train_peak_gib"]
    with pytest.raises(ValueError, match="counted for task sft"):
        size_guide({"x": facts("llama-3.1-8b")}, task="classification")


# ----------------------------------------------------------------------------------------------- preflight
def test_the_probe_is_skipped_for_a_classifier_and_says_why(tmp_path):
    from lorapipe.config import ModelSection
    from lorapipe.phases.measure import probe_checks

    plan = decide_plan(classify(backend="hf"), make_probe(cuda_gib=24, packages=NO_MLX), cls_facts("bert-base-uncased"),
                       task="classification")
    checks, rows = probe_checks(ModelSection(name_or_path="bert-base-uncased"), classify(), plan, EvaluateSection(),
                                str(tmp_path))
    assert rows == [] and [c.status for c in checks] == ["warn"]
    assert "skipped: task classification" in checks[0].measured and "causal-LM" in checks[0].detail


def test_preflight_report_and_recommended_config_name_the_task():
    from lorapipe.hardware.preflight import build_report, recommended_config

    facts = cls_facts("bert-base-uncased", 5)
    hw = make_probe(cuda_gib=24, packages=NO_MLX)
    plan = decide_plan(classify(method="full", backend="hf"), hw, facts, task="classification", num_labels=5)
    report = build_report(hw, facts, None, plan, [], [], "/tmp", None, "hf")
    measured = {c.name: c.measured for c in report.checks}
    assert "encoder sequence classifier, 5 labels" in measured["model config"]
    assert any(c.name == "plan" and c.measured.startswith("classification (5 labels, train.method full)")
               for c in report.checks)
    assert recommended_config(plan)["train"]["method"] == "full"
