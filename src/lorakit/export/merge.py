"""`lorakit merge`: fold a run's adapter into the weights it was trained against, check the result
against base + adapter on held-out prompts, and save a standalone Hugging Face model.

"The weights it was trained against" are the base as the run loaded it. For qlora that is the NF4
base dequantized, not the original 16-bit weights: merging into those adds the quantization error
W16 - dequant(NF4(W16)), which the adapter never saw and which can outweigh its own update
(reliability.md §1.4). So every linear layer is first set to exactly what training computed with.
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import jinja2
import torch

from lorakit import console, models
from lorakit.config import Config, load_config
from lorakit.data.load import read_messages
from lorakit.data.render import eot_token_ids
from lorakit.data.sandbox import render_chat
from lorakit.errors import LorakitError

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# Largest |logit(merged) - logit(base + adapter)| accepted, by saved dtype; both computed in fp32.
# fp32: the merge only regroups fp32 sums, (W + BA)x against Wx + B(Ax): measured 1.2e-4 on
#   SmolLM2-135M (30 layers, logits up to ~40). 1e-3 leaves 8x room; a real mistake (adapter lost,
#   merged into the wrong base) moves logits by whole units (measured 25-27 on a 3-step adapter).
# bf16: rounding every weight to 8 significant bits moved SmolLM2's logits by up to 0.41. bf16 itself
#   cannot tell logits of 32..64 apart closer than 0.25, so 1.0 (4 such steps) is the format's own
#   resolution, still 25x below those mistakes.
TOLERANCE = {"fp32": 1e-3, "bf16": 1.0}

# Checked when the run has no data.eval: short, generic, and rendered through the run's template.
BUILTIN_PROMPTS = ["What is the capital of France?", "Write one sentence about the sea.",
                   "List three prime numbers.", "How do I reverse a list in Python?",
                   "Give me a name for a grey cat."]


class VerifyFailed(LorakitError):
    """An exported model does not reproduce the one it came from: the run failed (exit 1)."""

    exit_code = 1


@dataclass
class Run:
    """A finished run directory: its resolved config and the tokenizer + chat template it trained with."""

    path: Path
    cfg: Config
    tokenizer: object
    model_path: str

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def stop_ids(self) -> list[int]:
        return eot_token_ids(self.tokenizer)


@dataclass
class MergeResult:
    out: Path | None  # None when merged in memory only (export uses it that way)
    model: object = None  # the merged model, fp32, for callers that go on (export)
    max_logit_diff: float = 0.0  # merged vs base + adapter, on the check prompts
    adapter_effect: float = 0.0  # base vs base + adapter: how much the merge had to preserve
    tolerance: float = 0.0
    merged_into: str = ""


def open_run(run_dir: str | Path) -> Run:
    """Check that `run_dir` holds a trained adapter and read its config; loads no weights."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file() or not (run / "adapter" / "adapter_config.json").is_file():
        raise LorakitError(f"{run}: not a finished lorakit run (it needs config.yaml and adapter/adapter_config.json). "
                           f"Train one with: lorakit train CONFIG output_dir={run}")
    cfg = load_config(run / "config.yaml", require_train=False)
    # The adapter folder holds the tokenizer with the chat template the run trained with.
    tokenizer = models.load_tokenizer(str(run / "adapter"), cfg.trust_remote_code)
    return Run(run, cfg, tokenizer, models.resolve_model(cfg.model))


def load_trained(run: Run, device: torch.device):
    """Base + adapter exactly as the run trained it (NF4 for qlora), as a PEFT model in eval mode."""
    from peft import PeftModel

    precision = models.resolve_precision(run.cfg.train.precision, device)
    base = models.load_base(run.cfg, run.model_path, precision, device)
    base.config.use_cache = True  # training turned the KV cache off; generation wants it
    return PeftModel.from_pretrained(base, run.adapter).eval()


def merge(run_dir: str | Path, out: str | Path, dtype: str = "bf16") -> MergeResult:
    """Merge RUN_DIR's adapter and save the model in `out` as `dtype` (bf16 | fp32); raises
    VerifyFailed when its logits differ from base + adapter by more than TOLERANCE[dtype]."""
    out = Path(out)
    if dtype not in DTYPES:
        raise LorakitError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}.")
    _check_out(out)
    run = open_run(run_dir)
    result = merge_verified(run, dtype)
    _save(result.model.to(DTYPES[dtype]), run, out, dtype, result)
    result.out, result.model = out, None
    return result


def merge_verified(run: Run, dtype: str = "fp32") -> MergeResult:
    """The merged model in fp32 whose weights, rounded to `dtype`, were checked against base + adapter."""
    device = models.default_device()
    prompts = check_prompts(run)
    trained = compute_in_fp32(load_trained(run, device))
    with models.dequantizing_4bit(trained):  # fp32 matmuls, and weights `_dequantized` can read
        reference = logits(trained, prompts)
        with trained.disable_adapter():
            effect = max_diff(logits(trained, prompts), reference)
        merged = merged_model(run, trained_base=trained.unload())
    del trained  # the quantized base: no longer needed, and as large as a 4-bit copy of the model
    diff = max_diff(logits(_rounded(merged, DTYPES[dtype]), prompts), reference)
    into = describe_base(run.cfg)
    result = MergeResult(None, merged, diff, effect, TOLERANCE[dtype], into)
    console.info(f"merged into {into}; largest logit difference from base + adapter on {len(prompts)} prompts: "
                 f"{diff:.2e} ({dtype}, tolerance {TOLERANCE[dtype]:g}; the adapter itself moves them by {effect:.2f})")
    if not diff <= TOLERANCE[dtype]:  # `not <=` also catches NaN
        hint = "Try --dtype fp32" if dtype != "fp32" else "Please report this"
        raise VerifyFailed(f"the merged model's logits differ from base + adapter by {diff:.3g}, above the "
                           f"tolerance {TOLERANCE[dtype]:g} for {dtype}; nothing was written. {hint}, or serve the "
                           f"adapter unmerged (docs/export.md).")
    return result


def describe_base(cfg: Config) -> str:
    if cfg.method == "qlora":
        return (f"the dequantized {cfg.quant.type.upper()} weights the adapter was trained against "
                f"(not the original 16-bit weights)")
    return "the base weights the adapter was trained against"


def merged_model(run: Run, trained_base=None):
    """The fp32 base with the adapter folded in. `trained_base` (the run's base as loaded for training,
    NF4 for qlora) supplies the weights to merge into; None merges into the original checkpoint."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(run.model_path, dtype=torch.float32,
                                                 trust_remote_code=run.cfg.trust_remote_code,
                                                 **models.weight_loading(run.model_path, run.cfg.allow_pickle))
    if trained_base is not None:
        _copy_weights(trained_base, dense)
    return PeftModel.from_pretrained(dense, run.adapter).merge_and_unload().eval()


def _copy_weights(source, dense) -> None:
    """Set every parameter of `dense` to `source`'s, dequantizing 4-bit ones, in place (no second copy)."""
    target = dict(dense.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for module_name, module in source.named_modules():
            for name, p in module.named_parameters(recurse=False):
                target[f"{module_name}.{name}" if module_name else name].copy_(_dequantized(p))


def _dequantized(p: torch.Tensor) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Params4bit

    return dequantize_4bit(p.data, p.quant_state) if isinstance(p, Params4bit) else p.data


def compute_in_fp32(model):
    """Upcast the non-quantized weights (exactly) and run 4-bit matmuls in fp32, so that comparisons
    measure the export, not bf16 arithmetic."""
    from bitsandbytes.nn import Linear4bit, Params4bit

    for p in model.parameters():
        if not isinstance(p, Params4bit):
            p.data = p.data.float()
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.compute_dtype = torch.float32
    return model


def _rounded(model, dtype: torch.dtype):
    """Round the weights to `dtype` in place, keeping fp32 storage: the check then sees exactly the
    values that will be saved, computed in fp32."""
    if dtype != torch.float32:
        for p in model.parameters():
            p.data = p.data.to(dtype).float()
    return model


def check_prompts(run: Run, limit: int = 5) -> list[torch.Tensor]:
    """Token ids of up to `limit` held-out prompts: data.eval conversations up to their last answer,
    else BUILTIN_PROMPTS; each ends with the template's generation prompt."""
    if run.cfg.data.eval:
        examples = [ex.messages for ex, _ in zip(read_messages(run.cfg.data.eval), range(limit))]
        conversations = [m[:max(i for i, t in enumerate(m) if t["role"] == "assistant")] for m in examples]
    else:
        conversations = [[{"role": "user", "content": p}] for p in BUILTIN_PROMPTS[:limit]]
    return [encode_chat(run.tokenizer, messages) for messages in conversations]


def encode_chat(tokenizer, messages: list[dict]) -> torch.Tensor:
    """A (1, n) tensor: the conversation through the chat template with the generation prompt, and BOS
    only if the template leaves it out and the tokenizer would add it."""
    try:
        text = render_chat(tokenizer, messages, None, add_generation_prompt=True)  # bounded sandbox
    except jinja2.TemplateError as e:  # e.g. a template that allows no system message
        raise LorakitError(f"the chat template refused this conversation: {e}") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if adds_bos(tokenizer) and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id, *ids]
    return torch.tensor([ids])


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS before plain text (llama.cpp's add_bos_token)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


@torch.no_grad()
def logits(model, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [model(input_ids=ids.to(device)).logits.float().cpu() for ids in prompts]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise LorakitError(f"--out {out}: is a file; give a folder for the merged model.")
    if out.exists() and any(out.iterdir()) and not (out / "lorakit_merge.json").is_file():
        raise LorakitError(f"--out {out}: the folder exists and holds other files. Choose a new folder "
                           f"(lorakit only replaces an earlier merge of its own).")


def _save(model, run: Run, out: Path, dtype: str, result: MergeResult) -> None:
    """Model (safetensors) + tokenizer + chat template + generation config that stops at end of turn,
    written to a temp folder and renamed into place."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.generation_config.eos_token_id = run.stop_ids
    model.generation_config.pad_token_id = run.tokenizer.pad_token_id
    model.save_pretrained(tmp)
    run.tokenizer.save_pretrained(tmp)
    provenance = {"run": str(run.path.resolve()), "base": run.cfg.model, "method": run.cfg.method, "dtype": dtype,
                  "merged_into": result.merged_into, "max_logit_diff": result.max_logit_diff,
                  "tolerance": result.tolerance, "adapter_effect": result.adapter_effect}
    (tmp / "lorakit_merge.json").write_text(json.dumps(provenance, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    console.info(f"wrote {out} ({dtype}); end-of-turn ids {run.stop_ids} are its generation eos")
