"""The planner: its parts scale as the training step does, it matches the allocator on a real
(tiny) training step, and its decisions follow from the numbers."""

import importlib.util
import inspect
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lorakit import plan
from lorakit.config import Config
from lorakit.train import fast

ROOT = Path(__file__).resolve().parents[2]
GiB = 2**30


def _bench():
    spec = importlib.util.spec_from_file_location("plan_memory", ROOT / "benchmarks" / "plan_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _arch(name="llama-3.1-8b"):
    return plan.arch_from_config(plan.ARCHS[name])


def _step(**kw):
    base = dict(method="lora", device="cuda", precision="bf16", checkpointing=False, rows=4, seq=1024,
                trained=4 * 1023, masked=False)
    return plan.Step(**{**base, **kw})


@pytest.mark.parametrize("name", sorted(plan.ARCHS))
def test_parameter_count_matches_transformers(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = plan.ARCHS[name]
    config = AutoConfig.for_model(spec["model_type"], **{k: v for k, v in spec.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert plan.arch_from_config(config).params == sum(p.numel() for p in model.parameters())


def test_activations_double_with_sequence_length():
    arch = _arch()
    short = plan.step_memory(arch, _step(seq=1024, trained=1))
    long = plan.step_memory(arch, _step(seq=2048, trained=1))
    assert long.activations == pytest.approx(2 * short.activations, rel=0.005)  # less the per-layer casts


def test_checkpointing_keeps_only_layer_inputs():
    arch = _arch()
    off = plan.step_memory(arch, _step())
    on = plan.step_memory(arch, _step(checkpointing=True))
    assert on.activations < off.activations / 20
    # what stays is each layer's bf16 input (plus the final norm's fp32 input)
    assert on.activations == pytest.approx(4 * 1024 * (arch.layers * 2 * arch.hidden + 4 * arch.hidden + 4))


def test_qlora_weights_are_half_a_byte_per_param_plus_absmax():
    arch = _arch()
    quantized = arch.layers * arch.layer_linear_params
    rest = (arch.params - quantized) * 2  # embeddings, norms, lm_head stay bf16
    qlora = plan.base_weight_bytes(arch, _step(method="qlora"))
    per_param = (qlora - rest) / quantized
    assert 0.5 + 1 / 64 < per_param < 0.5 + 1 / 64 + 0.001  # NF4 + double-quantized absmax
    single = plan.base_weight_bytes(arch, _step(method="qlora", double_quant=False))
    assert (single - rest) / quantized == pytest.approx(0.5 + 4 / 64, rel=1e-3)
    assert plan.base_weight_bytes(arch, _step()) == arch.params * 2


def test_loss_peak_is_chunked_like_the_loss():
    from lorakit.train.loss import chunked_cross_entropy_sum

    assert plan.LOSS_CHUNK == inspect.signature(chunked_cross_entropy_sum).parameters["chunk"].default
    assert plan.cpu_chunk_tokens(49152) == 256  # SmolLM2's vocabulary: 48 MiB of fp32 logits
    arch = _arch()
    one_chunk = plan.step_memory(arch, _step(trained=2000)).transient
    two_chunks = plan.step_memory(arch, _step(rows=8, seq=2048, trained=8000)).transient
    assert one_chunk == pytest.approx(10 * arch.vocab * 2000 + 4 * arch.hidden * 2000)
    # the second chunk is computed while the first's fp32 logits and gradient are still bound
    assert two_chunks == pytest.approx(arch.vocab * (8 * 4096 + 6 * 3904) + 4 * arch.hidden * 8000)


def test_dropout_and_mask_cost_what_the_step_keeps():
    arch = _arch()
    plain = plan.step_memory(arch, _step(dropout=0.0, trained=1)).activations
    dropout = plan.step_memory(arch, _step(trained=1)).activations
    masked = plan.step_memory(arch, _step(dropout=0.0, trained=1, masked=True)).activations
    assert dropout > plain  # one bool mask byte per LoRA input feature
    # a mask materialises k and v for every head and a float mask per layer
    extra = 4 * 1024 * arch.layers * (2 * 2 * (arch.q_dim - arch.kv_dim) + 2 * 1024) + 4 * 1024 * 1024
    assert masked - plain == pytest.approx(extra)


# Peak allocated GiB of lorakit's compiled training step (fast.speedups + the fused loss step) on an H200:
# random full rows of 2048 tokens, r16/alpha32 all-linear, bf16 autocast, 16,384 tokens per optimizer
# step. (arch, method, micro-batch, checkpointing, activation budget, LoRA dropout, GiB, results file
# benchmarks/results/gpu_throughput_<file>.json, arm); rows packed where the file's data says so.
# Budget 1.0 for the 8B: sessions 2-3, before fast.ACTIVATION_BUDGET; 0.8 for the 0.6B: session 4
# applied it to every model. Dropout 0.05: session 6, fast.SeededDropout recomputing its masks (fp8
# arms: the same memory as the bf16 matmuls).
H200_COMPILED = [
    ("llama-3.1-8b", "qlora", 4, False, 0.8, 0.0, 32.43, "2026-11-29_s4_llama_budget", "llama-qlora-mb4-fast"),
    ("llama-3.1-8b", "qlora", 8, False, 0.8, 0.0, 55.63, "2026-11-29_s4_llama_fp8", "llama-qlora-mb8-fp8"),
    ("llama-3.1-8b", "qlora", 2, False, 1.0, 0.0, 25.33, "2026-11-29_s2", "llama-qlora-mb2-fast"),
    ("llama-3.1-8b", "qlora", 4, False, 1.0, 0.0, 43.45, "2026-11-29_s3_llama_50", "llama-qlora-mb4-fast"),
    ("llama-3.1-8b", "qlora", 8, True, 0.8, 0.0, 14.32, "2026-11-29_s2_blocks", "llama-qlora-mb8-ckpt-blocks"),
    ("llama-3.1-8b", "qlora", 4, True, 0.8, 0.0, 11.47, "2026-11-29_s2_blocks", "llama-qlora-mb4-ckpt-blocks"),
    ("llama-3.1-8b", "lora", 8, False, 0.8, 0.0, 65.26, "2026-11-29_s4_lora_a", "llama-lora-mb8-fast"),
    ("llama-3.1-8b", "lora", 2, False, 1.0, 0.0, 35.98, "2026-11-29_s3_llama_lora", "llama-lora-mb2-fast"),
    ("llama-3.1-8b", "lora", 4, False, 1.0, 0.0, 55.09, "2026-11-29_s3_llama_lora", "llama-lora-mb4-fast"),
    ("qwen3-0.6b", "qlora", 8, False, 1.0, 0.0, 23.73, "2026-11-29_s3_qwen", "qwen-qlora-mb8-fast"),
    ("qwen3-0.6b", "qlora", 8, False, 0.8, 0.0, 19.21, "2026-11-29_s4_qwen_a", "qwen-qlora-mb8-fast"),
    ("llama-3.1-8b", "qlora", 4, False, 0.8, 0.05, 32.43, "2026-11-29_s6c_hash32_d0.05_llama-qlora-mb4-fast",
     "llama-qlora-mb4-fast"),
    ("llama-3.1-8b", "qlora", 8, False, 0.8, 0.05, 55.62, "2026-11-29_s6d_hash32_d0.05_llama-qlora-mb8-fast",
     "llama-qlora-mb8-fast"),
    ("llama-3.1-8b", "qlora", 8, True, 0.8, 0.05, 14.76, "2026-11-29_s6b_hash64_d0.05_llama-qlora-mb8-ckpt-fast",
     "llama-qlora-mb8-ckpt-fast"),
    ("llama-3.1-8b", "lora", 4, False, 0.8, 0.05, 42.09, "2026-11-29_s6d_hash32_d0.05_llama-lora-mb4-fp8",
     "llama-lora-mb4-fp8"),
    ("qwen3-0.6b", "qlora", 8, False, 1.0, 0.05, 28.1, "2026-11-29_s6d_hash32_d0.05_qwen-qlora-mb8-fast",
     "qwen-qlora-mb8-fast"),
    # packed rows (--packed 512), session 8: segment attention by varlen flash-attention; no float mask
    ("llama-3.1-8b", "qlora", 4, False, 0.8, 0.05, 32.43, "2026-11-30_s8b_packed512_after_d0.05_llama-qlora-mb4-fast",
     "llama-qlora-mb4-fast"),
    ("qwen3-0.6b", "qlora", 8, False, 1.0, 0.05, 30.06, "2026-11-30_s8c_packed512_after_d0.05_qwen-qlora-mb8-cg-fp8",
     "qwen-qlora-mb8-cg-fp8"),
]


@pytest.mark.parametrize("name, method, rows, gc, budget, dropout, gib, file, arm", H200_COMPILED,
                         ids=[f"{c[0]}-{c[1]}-mb{c[2]}{'-gc' if c[3] else ''}-budget{c[4]}-dropout{c[5]}"
                              for c in H200_COMPILED])
def test_compiled_step_matches_h200_peaks(monkeypatch, name, method, rows, gc, budget, dropout, gib, file, arm):
    results = ROOT / "benchmarks" / "results" / f"gpu_throughput_{file}.json"
    measured = next(r for r in json.loads(results.read_text())["results"] if r["arm"] == arm)
    assert measured["peak_gib"] == gib and measured["micro_batch"] == rows and measured["checkpointing"] == gc
    lora = json.loads(results.read_text())["meta"]["lora"]  # "r=16 alpha=32 dropout=0.05 all-linear, ..."
    assert float(lora.split("dropout=")[1].split()[0]) == dropout
    arch = _arch(name)
    packed = "packed" in json.loads(results.read_text())["meta"]["data"]
    step = _step(method=method, rows=rows, seq=2048, trained=rows * 2047, checkpointing=gc, dropout=dropout,
                 compiled=True, masked=packed)
    monkeypatch.setattr(fast, "ACTIVATION_BUDGET", budget)
    monkeypatch.setattr(fast, "LARGE_MODEL", 0)  # the arm's budget, whatever the model's size
    assert plan.activation_budget(arch, step) == budget
    assert plan.step_memory(arch, step).allocated / GiB == pytest.approx(gib, rel=0.05)


def test_activation_budget_is_fast_speedups_rule(monkeypatch):
    arch, step = _arch(), _step(compiled=True, dropout=0.0)
    assert plan.activation_budget(arch, step) == fast.ACTIVATION_BUDGET
    assert plan.activation_budget(_arch("qwen3-0.6b"), step) == 1.0
    low = plan.step_memory(arch, step).activations
    assert low < 0.5 * plan.step_memory(arch, replace(step, compiled=False)).activations
    monkeypatch.setattr(fast, "ACTIVATION_BUDGET", 1.0)
    full = plan.step_memory(arch, step).activations
    # kept at 1.0 only: the normed inputs, SwiGLU's product, lora's second copy of o_proj's input
    # and autocast's copies of the LoRA weights
    per_token = 2 * (2 * arch.hidden + arch.intermediate + arch.q_dim)
    per_layer = 2 * sum(step.r * (l.n_in + l.n_out) for l in arch.linears)
    assert full - low == arch.layers * (per_token * step.tokens + per_layer)


@pytest.mark.parametrize("budget", [0.8])  # 1.0 (models under 1e9 parameters): the H200 peaks above
def test_compiled_layer_keeps_what_the_planner_counts(monkeypatch, tmp_path, budget):
    """One compiled LoRA + NF4 Llama layer on the CPU (fast.compile_layers, with SeededDropout as
    fast.speedups swaps in on CUDA): the tensors its forward saves for the backward, against
    _compiled_layer_activations."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    config = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=704, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=1, head_dim=128, vocab_size=128)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.bfloat16)
    model.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.05))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    assert fast.cheap_dropout(model, fast.SeededDropout) == fast.reseed(model) == 7
    arch = plan.arch_from_config(config)
    rows, seq = 2, 80
    step = _step(method="qlora", rows=rows, seq=seq, trained=rows * seq, r=8, dropout=0.05, compiled=True)
    monkeypatch.setattr(fast, "ACTIVATION_BUDGET", budget)
    monkeypatch.setattr(fast, "LARGE_MODEL", 0)
    model.train()
    base = model.get_base_model().model
    x = torch.randn(rows, seq, arch.hidden, dtype=torch.bfloat16, requires_grad=True)
    position = torch.arange(seq)[None].expand(rows, -1)
    rotary = base.rotary_emb(x, position)
    shared = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), *rotary]}
    torch._dynamo.reset()  # layers share their code: a graph compiled at another budget would be reused
    with torch._functorch.config.patch(activation_memory_budget=1.0):  # compile_layers sets the global
        fast.compile_layers(model, budget=plan.activation_budget(arch, step))
        for _ in range(2):  # the first call compiles
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = base.layers[0](x, attention_mask=None, position_ids=position, position_embeddings=rotary)
            (out[0] if isinstance(out, tuple) else out).float().sum().backward()
    kept = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    measured = sum(n for ptr, n in kept.items() if ptr not in shared)
    per_token, per_layer = plan._compiled_layer_activations(arch, step)
    if budget == 1.0:  # on the CPU, SDPA's output is laid out by head and o_proj's input is a copy of it;
        per_token += 2 * arch.q_dim  # CUDA's flash kernel writes it in o_proj's layout (H200 peaks above)
    assert measured == per_token * rows * seq + per_layer


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("case", [dict(rows=4, seq=96), dict(rows=2, seq=128, masked=True, trained=0.2, dropout=0.0)])
def test_predicted_allocation_matches_a_real_cpu_step(case, precision):
    """The allocator's own peak (torch profiler memory events) of lorakit's step on a tiny model; bf16
    as train runs it on the CPU: a bf16 base under autocast, PEFT's input cast off."""
    bench = _bench()
    torch.manual_seed(0)
    c = bench.config("tiny", "tiny", "lora", case["rows"], case["seq"], masked=case.get("masked", False),
                     trained=case.get("trained", 1.0), dropout=case.get("dropout", 0.05))
    from peft.helpers import disable_input_dtype_casting
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit import models

    dtype = getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[precision])
    spec = {k: v for k, v in bench.TINY.items() if k != "model_type"}
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **spec), dtype=dtype)
    base.config.use_cache = False
    base.requires_grad_(False)
    model = models.attach_lora(base, bench.lorakit_config("tiny", "lora", c["dropout"]), False)
    with torch.autocast("cpu", dtype=dtype, enabled=precision != "fp32"), \
            disable_input_dtype_casting(model, active=precision != "fp32"):
        measured = bench._allocator_peak(model, bench.make_batch(c, base.config.vocab_size, "cpu"))
    predicted = bench.predicted(c, "cpu", precision).allocated
    assert predicted == pytest.approx(measured, rel=0.05)


_TRAIN_AND_MEASURE = """
import json, sys
import lorakit
from lorakit import plan
cfg = lorakit.load_config(sys.argv[1], sys.argv[2:])
p = plan.plan(cfg)
lorakit.train(cfg)
hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"measured": hwm, "predicted": p.option(p.configured).peak_bytes}))
"""


@pytest.mark.slow
def test_predicted_rss_of_a_training_run_on_the_embedded_model(tmp_path):
    """Peak RSS of `lorakit.train` (2 optimizer steps of the demo config: SmolLM2-135M, 8 rows of
    ~110-130 tokens) in a fresh process, against the plan of the same config."""
    import subprocess
    import sys

    overrides = ["train.max_steps=2", "data.eval=null", "eval.after_train=false", "train.save_every=1000",
                 f"output_dir={tmp_path / 'run'}"]
    proc = subprocess.run([sys.executable, "-c", _TRAIN_AND_MEASURE,
                           str(ROOT / "examples" / "support_tickets" / "config.yaml"), *overrides],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["predicted"] == pytest.approx(result["measured"], rel=0.20), \
        (result["predicted"] / GiB, result["measured"] / GiB)


@pytest.fixture
def llama8b_dir(tmp_path) -> str:
    """A config-only model directory: the planner never reads weights."""
    spec = plan.ARCHS["llama-3.1-8b"]
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **spec}))
    return str(tmp_path)


def _cfg(model: str, **train) -> Config:
    cfg = Config(model=model)
    cfg.data.max_length = 2048
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_plan_says_what_fits_a_small_gpu(llama8b_dir):
    p = plan.plan(_cfg(llama8b_dir, batch_size=8), gpu_mem_bytes=24 * GiB)
    assert p.device_kind == "cuda" and p.device_memory == 24 * GiB
    fits = {o.label: o.fits for o in p.options}
    assert fits == {"lora": False, "lora + checkpointing": False, "qlora": False, "qlora + checkpointing": True}
    assert p.configured == "lora + checkpointing"  # train's auto rule: on for CUDA models over 3B
    assert p.change == "method=qlora train.gradient_checkpointing=true"
    text = plan.format_plan(p)
    assert "NO" in text and "yes" in text and "lorakit train CONFIG method=qlora" in text
    assert "assumed" in text  # no data: rows of data.max_length
    back = json.loads(p.to_json())
    assert [o["label"] for o in back["options"]] == [o.label for o in p.options]
    assert all(o["peak_bytes"] > 0 and o["tok_s"] > 0 for o in back["options"])


def test_nothing_fits_a_tiny_gpu(llama8b_dir):
    p = plan.plan(_cfg(llama8b_dir), gpu_mem_bytes=2 * GiB)
    assert not any(o.fits for o in p.options) and all(o.max_batch == 0 for o in p.options)
    assert "nothing fits" in p.recommendation


def test_too_large_micro_batch_is_split_into_accumulation(llama8b_dir):
    p = plan.plan(_cfg(llama8b_dir, batch_size=256), gpu_mem_bytes=80 * GiB)
    assert not any(o.fits for o in p.options)
    assert "train.batch_size=" in p.change and "train.grad_accum=" in p.change
    rows = int(p.change.split("train.batch_size=")[1].split()[0])
    accum = int(p.change.split("train.grad_accum=")[1].split()[0])
    assert rows * accum >= 256


def test_resolve_auto_picks_qlora_when_lora_does_not_fit(llama8b_dir):
    gpu = plan.Device("cuda", "H100", "test GPU", 24 * GiB, True)
    cfg = _cfg(llama8b_dir, batch_size=8, gradient_checkpointing=True)
    cfg.method = "auto"
    method, batch, reason = plan.resolve_auto(cfg, gpu)
    assert (method, batch) == ("qlora", 8)
    assert reason.startswith("method qlora: lora fits 4 rows of 2048 tokens, qlora 13 rows")
    assert reason.endswith("in 24.0 GiB of test GPU")
    cfg.train.batch_size = "auto"  # lora fits 4 rows, qlora 8 (a power of two): qlora
    assert plan.resolve_auto(cfg, gpu)[:2] == ("qlora", 8)
    method, batch, reason = plan.resolve_auto(cfg, plan.Device("cuda", "H200", "test GPU", 141e9, True))
    assert method == "lora" and batch == plan.AUTO_BATCH_MAX and "batch_size 16" in reason


def test_auto_checkpointing_stays_off_while_the_step_fits_the_gpu(llama8b_dir):
    """gradient_checkpointing: auto costs ~30% speed, so train turns it on only when the planner says
    the step without it would not fit (8B QLoRA at micro-batch 4: off on an H200, on on a 24 GiB card)."""
    cfg = _cfg(llama8b_dir, batch_size=4)
    cfg.method = "qlora"
    on, reason = plan.resolve_checkpointing(cfg, plan.Device("cuda", "H200", "test GPU", 141e9, True))
    assert not on and reason.startswith("off: qlora at micro-batch 4 needs")
    assert plan.plan(cfg, device=plan.Device("cuda", "H200", "test GPU", 141e9, True)).configured == "qlora"
    on, reason = plan.resolve_checkpointing(cfg, plan.Device("cuda", "H100", "test GPU", 24 * GiB, True))
    assert on and reason.startswith("on: ") and "of 24.0 GiB" in reason
    assert plan.resolve_checkpointing(cfg, torch.device("cpu")) == (False, "off on cpu")


def test_dequant_cache_takes_what_the_gpu_leaves_beside_the_step(llama8b_dir):
    """quant.dequant_cache: auto caches every 4-bit weight in bf16 where the GPU has room (8B: 14 GiB
    beside a ~33 GiB step on an H200), part of them on a 48 GiB card, none where the step fills the GPU;
    a number caps it; lora, the CPU and 0 get none."""
    cfg = _cfg(llama8b_dir, batch_size=4, gradient_checkpointing=False)
    cfg.method = "qlora"
    arch = plan.load_arch(llama8b_dir)
    everything = arch.layers * arch.layer_linear_params * 2
    held, reason = plan.resolve_dequant_cache(cfg, plan.Device("cuda", "H200", "test GPU", 141e9, True))
    assert held == everything and reason.startswith(f"{held / GiB:.1f} GiB of the 4-bit weights' ")
    peak = plan._find(plan.plan(cfg, device=plan.Device("cuda", "L40S", "test GPU", 48 * GiB, True)).options,
                      "qlora", False).peak_bytes
    held, _ = plan.resolve_dequant_cache(cfg, plan.Device("cuda", "L40S", "test GPU", 48 * GiB, True))
    room = plan.CHECKPOINT_HEADROOM * 48 * GiB - peak
    assert held == pytest.approx(room / plan.CACHE_PEAK_PER_BYTE) and 0 < held < everything
    assert plan.resolve_dequant_cache(cfg, plan.Device("cuda", "H100", "test GPU", peak, True))[0] == 0
    cfg.quant.dequant_cache = 6
    held, reason = plan.resolve_dequant_cache(cfg, plan.Device("cuda", "H200", "test GPU", 141e9, True))
    assert held == 6 * GiB and reason.endswith("capped at 6 GiB")
    cfg.quant.dequant_cache = 0
    assert plan.resolve_dequant_cache(cfg, plan.Device("cuda", "H200", "test GPU", 141e9, True)) == (0, "off")
    cfg.quant.dequant_cache, cfg.method = "auto", "lora"
    assert plan.resolve_dequant_cache(cfg, plan.Device("cuda", "H200", "test GPU", 141e9, True))[0] == 0
    cfg.method = "qlora"
    assert plan.resolve_dequant_cache(cfg, torch.device("cpu"))[0] == 0


def test_compile_false_plans_the_eager_step(llama8b_dir):
    """train compiles the decoder layers on CUDA when train.compile is on (not under FSDP); the plan
    follows: compiled figures then, the eager model otherwise and on the CPU."""
    gpu = plan.Device("cuda", "H100", "test GPU", 80 * GiB, True)
    cfg = _cfg(llama8b_dir, batch_size=4, gradient_checkpointing=False)
    cfg.method = "qlora"
    arch = plan.load_arch(llama8b_dir)
    work = plan.workload(cfg)

    def predicted(compiled):
        step = plan._step(cfg, gpu, "bf16", work, 4, "qlora", False)
        assert step.compiled == compiled
        return plan.step_memory(arch, step).total

    compiled = plan.plan(cfg, device=gpu)
    assert compiled.compiled and "compiled layers" in plan.format_plan(compiled)
    assert compiled.option("qlora").peak_bytes == predicted(True)
    cfg.train.compile = False
    eager = plan.plan(cfg, device=gpu)
    assert not eager.compiled and eager.option("qlora").peak_bytes == predicted(False)
    assert compiled.option("qlora").peak_bytes < 0.6 * eager.option("qlora").peak_bytes
    cfg.train.compile, cfg.train.distributed = "cudagraphs", "fsdp"  # FSDP runs eager layers
    assert plan.plan(cfg, device=gpu).option("qlora").peak_bytes == eager.option("qlora").peak_bytes
    cpu = plan.Device("cpu", "cpu", "test CPU", 64 * GiB, False)
    assert not plan._step(_cfg(llama8b_dir), cpu, "fp32", work, 4, "qlora", False).compiled


def test_resolve_auto_keeps_what_the_config_sets(llama8b_dir):
    gpu = plan.Device("cuda", "H100", "test GPU", 24 * GiB, True)
    cfg = _cfg(llama8b_dir, batch_size="auto", gradient_checkpointing=True)
    cfg.method = "qlora"
    method, batch, _ = plan.resolve_auto(cfg, gpu)
    assert method == "qlora" and 1 <= batch <= plan.AUTO_BATCH_MAX and batch & (batch - 1) == 0


@pytest.mark.parametrize("compiled", [False, True])
def test_measured_throughput_is_reported_as_measured(compiled):
    m = next(m for m in plan.MEASURED if m.device == "H200" and m.model == "llama-3.1-8b" and m.compiled == compiled)
    arch, step = plan._anchor_step(m)
    tok_s, how = plan.throughput(arch, step, "H200")
    assert tok_s == m.tok_s and how.startswith("measured")
    other, how = plan.throughput(arch, step, "A100")
    assert how.startswith("extrapolated") and other == pytest.approx(m.tok_s * 312 / 989, rel=0.05)
    assert ("compiled" in how) == compiled
    # the compiled step is the faster one: its estimates come from its own anchors
    eager = plan.throughput(arch, replace(step, compiled=False), "H200")[0]
    assert (tok_s > 1.3 * eager) if compiled else tok_s == eager


def test_parse_size():
    assert plan.parse_size("24GiB") == 24 * GiB
    assert plan.parse_size("80GB") == 80e9
    assert plan.parse_size("16000MiB") == 16000 * 2**20
    with pytest.raises(plan.PlanError, match="24GiB"):
        plan.parse_size("lots")
