"""The planner: its parts scale as the training step does, it matches the allocator on a real
(tiny) training step, and its decisions follow from the numbers."""

import importlib.util
import inspect
import json
from pathlib import Path

import pytest
import torch

from lorakit import plan
from lorakit.config import Config

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
    assert plan.cpu_chunk_tokens(49152) == 128  # SmolLM2's vocabulary: 24 MiB of fp32 logits
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


@pytest.mark.parametrize("case", [dict(rows=4, seq=96), dict(rows=2, seq=128, masked=True, trained=0.2, dropout=0.0)])
def test_predicted_allocation_matches_a_real_cpu_step(case):
    """The allocator's own peak (torch profiler memory events) of lorakit's step on a tiny model."""
    bench = _bench()
    torch.manual_seed(0)
    c = bench.config("tiny", "tiny", "lora", case["rows"], case["seq"], masked=case.get("masked", False),
                     trained=case.get("trained", 1.0), dropout=case.get("dropout", 0.05))
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit import models

    spec = {k: v for k, v in bench.TINY.items() if k != "model_type"}
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **spec), dtype=torch.float32)
    base.config.use_cache = False
    base.requires_grad_(False)
    model = models.attach_lora(base, bench.lorakit_config("tiny", "lora", c["dropout"]), False)
    measured = bench._allocator_peak(model, bench.make_batch(c, base.config.vocab_size, "cpu"))
    predicted = bench.predicted(c, "cpu").allocated
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
    assert reason.startswith("method qlora: lora fits 1 row of 2048 tokens, qlora 12 rows")
    assert reason.endswith("in 24.0 GiB of test GPU")
    cfg.train.batch_size = "auto"  # lora fits 1 row, qlora 8 (a power of two): qlora
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


def test_resolve_auto_keeps_what_the_config_sets(llama8b_dir):
    gpu = plan.Device("cuda", "H100", "test GPU", 24 * GiB, True)
    cfg = _cfg(llama8b_dir, batch_size="auto", gradient_checkpointing=True)
    cfg.method = "qlora"
    method, batch, _ = plan.resolve_auto(cfg, gpu)
    assert method == "qlora" and 1 <= batch <= plan.AUTO_BATCH_MAX and batch & (batch - 1) == 0


def test_measured_throughput_is_reported_as_measured():
    m = next(m for m in plan.MEASURED if m.device == "H200" and m.model == "llama-3.1-8b")
    arch, step = plan._anchor_step(m)
    tok_s, how = plan.throughput(arch, step, "H200")
    assert tok_s == m.tok_s and how.startswith("measured")
    other, how = plan.throughput(arch, step, "A100")
    assert how.startswith("extrapolated") and other == pytest.approx(m.tok_s * 312 / 989, rel=0.05)


def test_parse_size():
    assert plan.parse_size("24GiB") == 24 * GiB
    assert plan.parse_size("80GB") == 80e9
    assert plan.parse_size("16000MiB") == 16000 * 2**20
    with pytest.raises(plan.PlanError, match="24GiB"):
        plan.parse_size("lots")
