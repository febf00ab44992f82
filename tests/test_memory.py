"""The memory model term by term, the model facts from public config.json values, and the plan's choices at several
budgets. Machines are faked probes (plain data); the activation term is checked against what torch's autograd
really saves on a small Llama (saved-tensor hooks), so a transformers change that moves it fails here."""

import json

import pytest
import torch
from click.testing import CliRunner

from lorapipe.config import EvaluateSection, TrainSection
from lorapipe.hardware import facts as model_facts_module
from lorapipe.hardware import memory as mem
from lorapipe.hardware.facts import facts_from_config
from lorapipe.hardware.memory import MemoryInputs, estimate, lora_parameters
from lorapipe.hardware.plan import PlanError, decide_plan
from tests.model_facts import CONFIGS, autograd_saved_bytes, facts, tiny_facts
from tests.test_plan import ALL, make_probe

GIB = 2**30


def term(est, phase, name):
    return next(t.bytes for t in est.terms if t.phase == phase and t.name == name)


# ------------------------------------------------------------------------------------------------------ facts
def test_parameter_counts_match_the_published_sizes():
    # published parameter counts of these checkpoints
    assert facts("llama-3.1-8b").total_parameters == 8_030_261_248
    assert facts("llama-2-7b").total_parameters == 6_738_415_616
    assert facts("mistral-7b").total_parameters == 7_241_732_096
    one_b = facts("llama-3.2-1b")
    assert one_b.tied_embeddings and one_b.parameter_counts["lm_head"] == 0
    assert one_b.total_parameters == 1_235_814_400


def test_the_formula_agrees_with_the_model_built_on_the_meta_device():
    from transformers import AutoConfig

    for name in ("llama-3.2-1b", "mistral-7b"):
        cfg = AutoConfig.from_pretrained(str(CONFIGS / f"{name}.json"))
        by_formula, on_meta = facts_from_config(cfg), model_facts_module.count_on_meta(cfg)
        assert on_meta.counted == "meta"
        assert by_formula.parameter_counts == on_meta.parameter_counts, name
        assert [(s.name, s.in_features, s.out_features) for s in by_formula.linears] == \
            [(s.name, s.in_features, s.out_features) for s in on_meta.linears]


def test_an_architecture_without_a_formula_is_counted_on_the_meta_device():
    from transformers import GPT2Config

    f = facts_from_config(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=500))
    assert f.counted == "meta" and f.total_parameters > 0 and f.linears


def test_lora_parameters_follow_the_real_shapes_gqa_included():
    f = facts("llama-3.1-8b")  # 32 heads x 128, 8 KV heads: k/v project 4096 -> 1024
    shapes = {s.name: (s.in_features, s.out_features) for s in f.linears}
    assert shapes["q_proj"] == (4096, 4096) and shapes["k_proj"] == (4096, 1024) == shapes["v_proj"]
    # r x (in + out) per module per layer
    assert lora_parameters(f, 8, ["q_proj", "v_proj"]) == 32 * 8 * ((4096 + 4096) + (4096 + 1024))
    assert lora_parameters(f, 16, "all-linear") == 41_943_040
    assert lora_parameters(f, 16, "attention") < lora_parameters(f, 16, "all-linear")


def test_a_model_that_cannot_be_read_says_so_in_one_line(tmp_path):
    with pytest.raises(model_facts_module.ModelFactsError) as err:
        model_facts_module.model_facts(str(tmp_path))
    assert "no readable config.json" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(model_facts_module.ModelFactsError) as err:
        model_facts_module.model_facts("no-such-org/no-such-model-lorapipe")
    assert "not in the Hugging Face cache" in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------------ terms
def test_base_weight_terms_by_precision():
    f = facts("llama-3.1-8b")
    linear, other = f.layer_linear_parameters, f.total_parameters - f.layer_linear_parameters
    fp32 = estimate(f, MemoryInputs(device="cuda", dtype="float32"))
    bf16 = estimate(f, MemoryInputs(device="cuda", dtype="bfloat16"))
    assert term(fp32, "train", "base weights") == 4 * f.total_parameters
    assert term(bf16, "train", "base weights") == 2 * f.total_parameters
    dq = estimate(f, MemoryInputs(device="cuda", dtype="bfloat16", quantization="nf4"))
    no_dq = estimate(f, MemoryInputs(device="cuda", dtype="bfloat16", quantization="nf4", double_quant=False))
    assert term(dq, "train", "base weights (quantised linear layers)") == int(linear * (0.5 + 1 / 64 + 4 / 16384))
    assert term(no_dq, "train", "base weights (quantised linear layers)") == int(linear * (0.5 + 4 / 64))
    # embeddings, norms and lm_head stay unquantised: fp32 after peft's prepare_model_for_kbit_training (hf), 16-bit
    # where unsloth keeps them
    assert term(dq, "train", "base weights (embeddings, norms, lm_head)") == 4 * other
    unsloth = estimate(f, MemoryInputs(device="cuda", backend="unsloth", dtype="bfloat16", quantization="nf4"))
    assert term(unsloth, "train", "base weights (embeddings, norms, lm_head)") == 2 * other
    int8 = estimate(f, MemoryInputs(device="cuda", dtype="bfloat16", quantization="int8"))
    assert linear <= term(int8, "train", "base weights (quantised linear layers)") < 1.01 * linear


def test_lora_gradient_and_optimizer_terms():
    f = facts("llama-3.1-8b")
    n = lora_parameters(f, 16, "all-linear")
    for optimizer, per in (("adamw_torch", 8), ("paged_adamw_32bit", 8), ("adamw_8bit", 2), ("sgd", 0)):
        est = estimate(f, MemoryInputs(device="cuda", dtype="bfloat16", optimizer=optimizer))
        assert term(est, "train", "LoRA weights") == term(est, "train", "LoRA gradients") == 4 * n
        assert int(per * n) <= term(est, "train", "optimizer state") <= int((per + 0.04) * n)


def _saved_bytes_per_layer_token(h, inter, heads, kv_heads, head_dim, targets, dtype, seq=32, batch=2):
    """What autograd saves per token per decoder layer of transformers' Llama with PEFT LoRA (two depths, diffed)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    def saved(layers):
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=300, attn_implementation="sdpa")
        model = get_peft_model(LlamaForCausalLM(cfg).to(dtype), LoraConfig(r=8, target_modules=targets))
        ids = torch.randint(0, 300, (batch, seq))
        return autograd_saved_bytes(model, lambda: model(input_ids=ids, labels=ids))

    return (saved(3) - saved(1)) / 2 / (batch * seq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear"])
def test_activation_term_is_what_autograd_saves(dtype, targets):
    from transformers import LlamaConfig

    h, inter, heads, kv, hd = 96, 160, 4, 2, 32  # q = 128 != hidden: the q and hidden terms are told apart
    f = facts_from_config(LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=1,
                                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd, vocab_size=300))
    x = MemoryInputs(dtype=str(dtype).split(".")[1], lora_r=8, lora_targets=targets)
    predicted, _ = mem._activation_bytes_per_token_layer(f, x)
    peft_targets = targets if targets != "all-linear" else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]
    assert predicted == _saved_bytes_per_layer_token(h, inter, heads, kv, hd, peft_targets, dtype)


def test_activations_scale_with_tokens_and_checkpointing_keeps_one_layer():
    f = facts("llama-3.1-8b")
    one = estimate(f, MemoryInputs(device="cuda", dtype="bfloat16", micro_batch_size=1, seq_len=1024))
    two = estimate(f, MemoryInputs(device="cuda", dtype="bfloat16", micro_batch_size=2, seq_len=1024))
    assert term(two, "train", "activations") == 2 * term(one, "train", "activations")
    gc = estimate(f, MemoryInputs(device="cuda", dtype="bfloat16", micro_batch_size=2, seq_len=1024,
                                  gradient_checkpointing=True))
    kept = term(gc, "train", "activations (checkpointed layer inputs)")
    assert kept == 32 * 2 * 1024 * 2 * 4096  # layers x tokens x a*h
    assert term(gc, "train", "activations (one layer recomputed)") * 32 == term(two, "train", "activations")
    eager = estimate(f, MemoryInputs(device="cuda", dtype="bfloat16", seq_len=1024, attn_implementation="eager"))
    assert term(eager, "train", "activations") > term(one, "train", "activations")  # softmax probabilities kept


def test_logits_term_is_vocabulary_wide_and_dominates_a_small_model_with_a_big_vocabulary():
    """A backend computing the model's own loss (unsloth, mlx) holds the whole batch's logits."""
    from transformers import LlamaConfig

    small_big_vocab = facts_from_config(LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                                    num_attention_heads=8, num_key_value_heads=4, vocab_size=128256))
    est = estimate(small_big_vocab, MemoryInputs(dtype="float32", micro_batch_size=4, seq_len=1024,
                                                 backend="unsloth"))
    logits = term(est, "train", "logits and loss")
    assert logits == 4 * 1024 * 128256 * 4 * mem.LOGITS_FP32_COPIES
    assert logits > term(est, "train", "activations") and logits > sum(
        t.bytes for t in est.terms if t.name.startswith("base weights"))


def test_the_hf_sft_loss_is_trl_s_chunked_nll_and_its_logits_do_not_grow_with_the_batch():
    """TRL's chunked_nll (named in the hf backend's SFTConfig) projects 256 trained tokens at a time: the memory
    model counts one chunk, the catalog says how many tokens, and TRL's own constant must agree."""
    from transformers import LlamaConfig
    from trl.trainer import sft_trainer

    from lorapipe.catalog import BACKENDS

    assert sft_trainer._CHUNKED_LM_HEAD_CHUNK_SIZE == BACKENDS["hf"].sft_loss_chunk_tokens == 256
    f = facts_from_config(LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                      num_attention_heads=8, num_key_value_heads=4, vocab_size=128256))
    short, long = (estimate(f, MemoryInputs(dtype="float32", micro_batch_size=mb, seq_len=1024)) for mb in (1, 4))
    chunk = term(short, "train", "logits and loss (one chunk)")
    assert chunk == term(long, "train", "logits and loss (one chunk)") == int(256 * 128256 * 4 *
                                                                              mem.CHUNK_LOGITS_FP32_COPIES)
    assert "logits and loss" not in {t.name for t in short.phase_terms("train")}  # never the whole batch's
    tiny = estimate(f, MemoryInputs(dtype="float32", micro_batch_size=1, seq_len=100))
    assert term(tiny, "train", "logits and loss (one chunk)") == int(100 * 128256 * 4 * mem.CHUNK_LOGITS_FP32_COPIES)


def test_eval_and_merge_phases():
    f = facts("llama-3.1-8b")
    short = estimate(f, MemoryInputs(device="cuda", dtype="bfloat16", seq_len=1024, max_new_tokens=64))
    long = estimate(f, MemoryInputs(device="cuda", dtype="bfloat16", seq_len=1024, max_new_tokens=1152))
    # the KV cache: 2 x layers x kv heads x head dim x batch x (seq + new) x 2 B
    assert term(short, "eval", "KV cache") == 2 * 32 * 8 * 128 * 4 * (1024 + 64) * 2
    assert term(long, "eval", "KV cache") == 2 * term(short, "eval", "KV cache")
    # Llama-3.1-8B is stored in bfloat16, the merge dtype: the base's files are mapped, untied: one copy
    assert f.stored_dtype == "bfloat16"
    lora = lora_parameters(f, 16, "all-linear")
    mapped = term(short, "merge", "the base's files, mapped, with the adapter folded in")
    assert mapped == 2 * f.total_parameters + 4 * lora
    cpu = estimate(f, MemoryInputs(device="cpu", dtype="float32"))
    assert {t.name for t in short.terms if t.phase == "train"} >= {"CUDA context", "CUDA allocator overhead"}
    assert "process" in {t.name for t in cpu.terms if t.phase == "train"}
    assert short.as_json()["train_peak_bytes"] == sum(t.bytes for t in short.terms if t.phase == "train")


# ------------------------------------------------------------------------------------------------------ plan
NO_MLX = {k: v for k, v in ALL.items() if k not in ("unsloth", "mlx", "mlx_lm")}


@pytest.mark.parametrize("gpu_gib, model, expected", [
    (8, "llama-3.2-1b", ("none", True)), (24, "llama-3.1-8b", ("nf4", True)),
    (48, "llama-3.1-8b", ("none", False)), (80, "llama-3.1-8b", ("none", False))])
def test_balanced_profile_fits_each_gpu_with_its_margin(gpu_gib, model, expected):
    train = TrainSection(profile="balanced", max_seq_length=1024, effective_batch_size=16, backend="hf")
    plan = decide_plan(train, make_probe(cuda_gib=gpu_gib, packages=NO_MLX), facts(model),
                       user_set={"train.profile", "train.max_seq_length", "train.effective_batch_size",
                                 "train.backend"})
    t = plan.train
    assert (t.quantization, t.gradient_checkpointing) == expected
    assert t.memory.total_gib <= gpu_gib * 0.9 * 0.85  # 15% of the budget kept free
    assert t.micro_batch_size * t.gradient_accumulation_steps == 16
    assert t.optimizer == "paged_adamw_32bit" and t.profile == "balanced"
    # the evaluation batch is the largest that fits, or a warning says it does not (before training)
    assert plan.evaluate.predicted_peak_gib <= gpu_gib * 0.9 * 0.85 or plan.evaluate.warnings


def test_an_8b_qlora_run_on_16_gb_is_told_before_training_that_evaluation_would_not_fit():
    # training fits in 4-bit, but evaluation loads the base unquantised (15 GB of bf16 weights): said before training
    plan = decide_plan(TrainSection(profile="balanced", max_seq_length=1024, backend="hf"),
                       make_probe(cuda_gib=16, packages=NO_MLX), facts("llama-3.1-8b"),
                       user_set={"train.profile", "train.max_seq_length", "train.backend"})
    assert (plan.train.quantization, plan.train.gradient_checkpointing) == ("nf4", True)
    assert plan.evaluate.predicted_peak_gib > 16 * 0.9
    assert any("evaluation needs about" in w and "loads the base unquantised" in w for w in plan.evaluate.warnings)


def test_an_8b_model_does_not_fit_8_gb_and_the_refusal_says_so():
    with pytest.raises(PlanError, match="no single change fits"):
        decide_plan(TrainSection(profile="balanced", max_seq_length=1024, backend="hf"),
                    make_probe(cuda_gib=8, packages=NO_MLX), facts("llama-3.1-8b"),
                    user_set={"train.profile", "train.max_seq_length", "train.backend"})


def test_profiles_on_a_mac_and_a_cpu_box():
    mac = decide_plan(TrainSection(profile="conservative", max_seq_length=256, backend="mlx"),
                      make_probe(apple=True, ram_gib=16), facts("mistral-7b"),
                      user_set={"train.profile", "train.max_seq_length", "train.backend"})
    assert (mac.train.backend, mac.train.quantization, mac.train.gradient_checkpointing) == ("mlx", "nf4", True)
    assert mac.train.memory.total_gib <= 16 * 0.8 * 0.75
    cpu = decide_plan(TrainSection(profile="quality", max_seq_length=512), make_probe(ram_gib=24, packages=NO_MLX),
                      tiny_facts(), user_set={"train.profile", "train.max_seq_length"})
    assert (cpu.train.device, cpu.train.quantization, cpu.train.gradient_checkpointing) == ("cpu", "none", False)
    assert cpu.evaluate.batch_size == 8  # quality scores in larger batches where they fit


def test_values_the_user_set_are_kept_and_refused_with_the_knob_that_fits():
    set_keys = {"train.profile", "train.quantization", "train.max_seq_length", "train.backend"}
    train = TrainSection(profile="balanced", quantization="none", max_seq_length=2048, backend="hf")
    with pytest.raises(PlanError) as err:  # never silently switched to nf4
        decide_plan(train, make_probe(cuda_gib=24, packages=NO_MLX), facts("llama-3.1-8b"), user_set=set_keys)
    msg = str(err.value)
    assert "train.max_seq_length 2048 needs" in msg and "fits at" in msg
    assert "train.quantization none needs" in msg and "nf4 fits at" in msg
    # the same on 80 GB: kept as set, and the plan says so
    plan = decide_plan(train, make_probe(cuda_gib=80, packages=NO_MLX), facts("llama-3.1-8b"), user_set=set_keys)
    assert plan.train.quantization == "none"
    assert any("train.quantization none (set in the config, kept)" in r for r in plan.train.reasons)


def test_without_a_profile_the_config_is_taken_as_given():
    plan = decide_plan(TrainSection(max_seq_length=512, gradient_checkpointing=False), make_probe(cuda_gib=80,
                       packages=NO_MLX), facts("llama-3.1-8b"), EvaluateSection(batch_size=4))
    assert (plan.train.quantization, plan.train.gradient_checkpointing, plan.train.optimizer) == (
        "none", False, "adamw_torch")
    assert plan.evaluate.batch_size == 4


# ------------------------------------------------------------------------------------------------------ CLI
def test_a_checkpoint_loaded_in_its_stored_dtype_is_mapped_and_in_another_is_copied():
    """Merge in the checkpoint's dtype: one mapped copy (two for a tied causal LM: the base's and the merged model's
    pages); in another dtype: the copy, the shard or the read-back, as before. Evaluation in float32 of a bfloat16
    checkpoint: its files stay mapped beside the float32 weights."""
    from transformers import LlamaConfig

    def llama(dtype, tied=False):
        return facts_from_config(LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                             num_attention_heads=8, num_key_value_heads=4, vocab_size=32000,
                                             tie_word_embeddings=tied, dtype=dtype))

    x = MemoryInputs(device="cpu", dtype="float32", merge_dtype="bfloat16")
    bf16, tied, fp32 = llama("bfloat16"), llama("bfloat16", tied=True), llama("float32")
    mapped = "the base's files, mapped, with the adapter folded in"
    n = lora_parameters(bf16, 16, "all-linear")
    assert term(estimate(bf16, x), "merge", mapped) == 2 * bf16.total_parameters + 4 * n
    assert term(estimate(tied, x), "merge", mapped) == 2 * 2 * tied.total_parameters + 4 * n
    copied = estimate(fp32, x)
    assert mapped not in {t.name for t in copied.terms} and term(copied, "merge", "16-bit base with the adapter")
    files = "the checkpoint's files, mapped"
    assert term(estimate(bf16, x), "eval", files) == 2 * bf16.total_parameters
    assert files not in {t.name for t in copied.terms if t.phase == "eval"}  # float32 on disk, float32 loaded


def test_estimate_memory_cli_json_and_table(tmp_path):
    from lorapipe_app.cli import cli

    folder = tmp_path / "llama-3.1-8b"
    folder.mkdir()
    (folder / "config.json").write_text((CONFIGS / "llama-3.1-8b.json").read_text())
    runner = CliRunner()
    result = runner.invoke(cli, ["estimate-memory", str(folder), "--method", "qlora", "--seq-len", "2048",
                                 "--micro-batch-size", "2", "--lora-rank", "8", "--gradient-checkpointing", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["parameters"] == 8_030_261_248
    assert out["train_peak_bytes"] == sum(t["bytes"] for t in out["terms"]["train"].values())
    assert {"train_peak_bytes", "eval_peak_bytes", "merge_peak_bytes"} <= set(out)
    assert "activations (checkpointed layer inputs)" in out["terms"]["train"]
    table = runner.invoke(cli, ["estimate-memory", str(folder), "--load-test"])
    assert table.exit_code == 0 and "training peak:" in table.output and "logits and loss" in table.output
    offline = runner.invoke(cli, ["estimate-memory", "no-such-org/no-such-model-lorapipe"])
    assert offline.exit_code == 1 and "hub could not be reached" in offline.output
    assert "Traceback" not in offline.output


def test_estimate_memory_takes_every_knob_the_anchors_set(tmp_path):
    """A published figure's settings from the command line: a list of LoRA targets, the chunked loss, int8, no double
    quantisation; the JSON shows they were used, and a target the model lacks is refused with the names it has."""
    from lorapipe_app.cli import cli

    folder = tmp_path / "llama-2-7b"
    folder.mkdir()
    (folder / "config.json").write_text((CONFIGS / "llama-2-7b.json").read_text())
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(cli, ["estimate-memory", str(folder), "--backend", "unsloth", "--seq-len", "2048",
                                     *args, "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    two = run("--lora-targets", "q_proj,v_proj", "--lora-rank", "8")
    assert two["inputs"]["lora_targets"] == ["q_proj", "v_proj"]
    assert two["trainable_parameters"] == lora_parameters(facts("llama-2-7b"), 8, ["q_proj", "v_proj"])
    whole, chunked = run(), run("--loss-chunks", "8")
    assert chunked["inputs"]["loss_chunks"] == 8
    assert chunked["terms"]["train"]["logits and loss"]["bytes"] < whole["terms"]["train"]["logits and loss"]["bytes"]
    int8 = run("--quantization", "int8")
    nf4 = run("--method", "qlora", "--no-double-quant")
    assert (int8["inputs"]["quantization"], nf4["inputs"]["double_quant"]) == ("int8", False)
    refused = runner.invoke(cli, ["estimate-memory", str(folder), "--lora-targets", "q_proj,qkv"])
    assert refused.exit_code == 1 and "qkv" in refused.output and "k_proj" in refused.output


def test_every_published_anchor_is_reproduced_by_its_command_line(tmp_path):
    """bench/memory_anchors.py gives each anchor the `lorapipe estimate-memory` line that reproduces it: run with the
    model's config in a local folder in place of the hub id, it prints the same training terms."""
    import shlex

    from bench.memory_anchors import ANCHORS, HUB_IDS, command
    from lorapipe_app.cli import cli

    runner = CliRunner()
    for name, model, _published, _unit, _kind, settings, _source in ANCHORS:
        folder = tmp_path / model
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text((CONFIGS / f"{model}.json").read_text())
        args = shlex.split(command(model, settings))[1:]  # less the program name
        assert args[1] == HUB_IDS[model]
        args[1] = str(folder)
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, (name, result.output)
        printed = {k: v["bytes"] for k, v in json.loads(result.output)["terms"]["train"].items()}
        expected = {t.name: t.bytes for t in estimate(facts(model), MemoryInputs(**settings)).phase_terms("train")}
        assert printed == expected, name


def test_on_a_mac_the_budget_is_mlx_s_working_set():
    mac = make_probe(apple=True, ram_gib=16).model_copy(update={"mlx_working_set_gib": 10.7})
    plan = decide_plan(TrainSection(max_seq_length=256, quantization="nf4", backend="mlx"), mac, facts("mistral-7b"))
    assert plan.train.memory.budget_gib == pytest.approx(10.7)


def test_probe_measures_real_steps_beside_the_prediction(tiny_model_dir, tmp_path):
    """preflight.probe: 3 real training steps and one evaluation batch, each in a fresh process (real hf backend)."""
    from lorapipe.config import ModelSection
    from lorapipe.hardware.probe import probe
    from lorapipe.phases.measure import probe_checks

    train = TrainSection(backend="hf", device="cpu", max_seq_length=128, micro_batch_size=2, output_root=str(tmp_path))
    evaluate = EvaluateSection(batch_size=2, max_new_tokens=8)
    plan = decide_plan(train, probe(str(tmp_path)), model_facts_module.model_facts(str(tiny_model_dir)), evaluate)
    checks, rows = probe_checks(ModelSection(name_or_path=str(tiny_model_dir)), train, plan, evaluate, str(tmp_path))
    assert [r["phase"] for r in rows] == ["train", "eval"]
    for row, check in zip(rows, checks):
        assert row["error"] is not None and row["peak_gib"] > row["resident_at_start_gib"] > 0.3, row
        assert check.status in ("pass", "warn") and "predicted" in check.measured
        assert abs(row["error"]) < 0.25  # the tiny model is mostly the process: the constant is measured


def test_preference_terms_count_the_vocabulary_wide_tensors_of_trl_s_backward():
    """task: preference (TRL 1.14, hf backend): the peak is the backward's first step: the policy's logits, the two
    gradients of selective_log_softmax (its logsumexp's stacked, its gather's scattered), and ORPO's chosen-half
    log_softmax; the reference's logits are freed before it, but KTO's metrics copy them out beside it. On the CPU,
    loss temporaries under glibc's 32 MiB mmap threshold stay resident: the per-sequence ones, and the logged
    entropy's 128-row chunks (DPO, KTO)."""
    from transformers import LlamaConfig

    def pref(vocab, method, precompute=False, seq=256, mb=2, device="cpu"):
        f = facts_from_config(LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab),
                              task="preference")
        est = estimate(f, MemoryInputs(task="preference", preference_method=method, precompute_reference=precompute,
                                       dtype="float32", micro_batch_size=mb, seq_len=seq, device=device))
        return {t.name: t.bytes for t in est.phase_terms("train")}

    small, big = 32000, 151936
    dpo, kto, orpo = pref(small, "dpo"), pref(small, "kto"), pref(small, "orpo")
    tokens = {"dpo": 2 * 2 * 256, "kto": 2 * 256, "orpo": 2 * 2 * 256}  # a pair's two sides, KTO's one answer
    for method, terms in (("dpo", dpo), ("kto", kto), ("orpo", orpo)):
        copy = tokens[method] * small * 4
        assert terms["policy logits (saved for the backward)"] == copy
        assert terms["gradient of the logits (logsumexp's stacked, the gather's scattered)"] == 2 * copy
        assert terms["CPU allocator: per-sequence loss temporaries kept resident"] == copy  # 255 x 32000 x 4 < 32 MiB
        assert ("CPU allocator: the logged entropy's chunks kept resident" in terms) == (method != "orpo")
        assert ("ORPO's chosen NLL: log_softmax output (saved)" in terms) == (method == "orpo")
        assert not any(n.startswith("logits and loss") for n in terms)  # not SFT's full-logits loss
    assert orpo["ORPO's chosen NLL: log_softmax output (saved)"] == tokens["orpo"] * small * 4 // 2
    # the reference's logits, freed before the backward, beside the metrics' copies: DPO's side holds 2.5 copies (below
    # the backward's 3: 0 B), KTO's 3.5 (half a copy above); absent when precomputed and for ORPO
    ref = "reference forward (no gradients): logits, beside the metrics' copies"
    assert dpo[ref] == 0 and kto[ref] == tokens["kto"] * small * 4 // 2
    assert ref not in orpo and ref not in pref(small, "dpo", precompute=True) and ref not in pref(small, "kto", True)
    # vocabulary-wide terms scale with the vocabulary; over the threshold the allocator terms go (unmapped when freed)
    wide = pref(big, "dpo")
    logits = "policy logits (saved for the backward)"
    assert wide[logits] == dpo[logits] * big // small
    assert not any(n.startswith("CPU allocator: per-sequence") or "entropy" in n for n in wide)
    long = pref(small, "dpo", seq=512, mb=1)  # 511 x 32000 x 4 B: over; the entropy's 128 rows: under
    assert "CPU allocator: per-sequence loss temporaries kept resident" not in long
    assert "CPU allocator: the logged entropy's chunks kept resident" in long
    assert not any(n.startswith("CPU allocator") for n in pref(small, "dpo", device="cuda"))
