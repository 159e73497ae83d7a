"""The run configuration: typed dataclasses, read from YAML plus `section.key=value` overrides.

`load_config` checks everything in one pass and raises one `ConfigError` listing every problem;
the `Config` it returns is trusted by every later stage. Path keys come back as absolute strings.
"""

import copy
import difflib
import os
import reprlib
import types
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Literal, Union, get_args, get_origin, get_type_hints

import yaml

from lorakit.errors import LorakitError


@dataclass
class DataConfig:
    train: str | list[str] | None = None  # training examples: a file, a glob or a list of them
    eval: str | None = None  # held-out examples file; null = split from train (eval_split)
    eval_split: float = 0.0  # fraction of train held out for eval when `eval` is null
    format: Literal["auto", "messages", "prompt_completion", "text", "alpaca", "sharegpt"] = "auto"
    columns: dict[str, str] = field(default_factory=dict)  # our field -> your column, e.g. {prompt: question}
    template: str | None = None  # .jinja chat template file; null = the tokenizer's own template
    max_length: int = 1024  # tokens per example, prompt + answer
    too_long: Literal["error", "drop", "truncate"] = "error"  # longer examples: fail, skip or cut (all counted)
    loss_on: Literal["assistant", "completion", "all"] = "assistant"  # which tokens are trained on
    packing: bool = True  # pack several examples into one row of max_length tokens


@dataclass
class LoraSettings:
    r: int = 16  # adapter rank
    alpha: float = 32.0  # scaling: the update is multiplied by alpha / r
    dropout: float = 0.05  # dropout on the adapter input
    target_modules: str | list[str] = "all-linear"  # module names, or "all-linear"


@dataclass
class QuantConfig:
    type: Literal["nf4", "fp4"] = "nf4"  # 4-bit data type of the frozen base (qlora only)
    double_quant: bool = True  # also quantize the quantization constants (saves ~0.4 bit/param)
    # dtype the 4-bit matmuls run in; auto = the run's precision (bf16 where the hardware runs it
    # fast; on CPUs without AVX-512 BF16/AMX, bf16 4-bit matmuls ran ~30x slower than fp32)
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # CUDA, compiled training: bf16 copies of the 4-bit weights, made once and kept in GPU memory the
    # step leaves free, so training's matmuls skip bitsandbytes' dequantization at each use (the same
    # numbers; 2 bytes per cached weight instead of ~0.53). auto = what fits in 85% of the GPU beside
    # the step's planned peak; a number = at most that many GiB; 0 = off
    dequant_cache: float | Literal["auto"] = "auto"


@dataclass
class TrainConfig:
    epochs: float = 1.0  # passes over the training data (fractions allowed)
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int | Literal["auto"] = 8  # sequences (packed rows) per device per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1.0e-4  # peak learning rate
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"  # learning-rate decay after warmup
    warmup_ratio: float = 0.03  # fraction of steps spent warming up the learning rate
    weight_decay: float = 0.0  # AdamW weight decay on adapter weights
    max_grad_norm: float | None = 1.0  # gradient clipping norm; null disables clipping
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto = bf16 where supported
    gradient_checkpointing: bool | Literal["auto"] = "auto"  # trade compute for memory
    # CUDA only: torch.compile each decoder layer (train/fast.py); false = eager; cudagraphs = also
    # replay them as CUDA graphs (small models: less launch overhead; needs grad_accum 1)
    compile: bool | Literal["cudagraphs"] = True
    # CUDA GPUs with FP8 tensor cores (H100, L4, RTX 40xx and later): the frozen base's matmuls run in
    # FP8 with per-row scales (train/fp8.py): faster, not exact (docs/speed.md); needs compile on
    fp8: bool = False
    save_every: int = 200  # steps between checkpoints; the final adapter is always saved
    keep_checkpoints: int = 2  # most recent checkpoints kept on disk
    eval_every: int = 200  # steps between eval-loss measurements
    log_every: int = 10  # steps between lines in metrics.jsonl
    max_bad_steps: int = 3  # steps with a non-finite loss or gradient skipped before the run stops
    # several processes (--nproc, accelerate launch, torchrun): ddp = each holds the whole model;
    # fsdp = the base is sharded across GPUs (FSDP2), for models one GPU cannot hold; auto = ddp
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"


@dataclass
class EvalConfig:
    prompts: str | None = None  # prompts file to generate from; null = data.eval
    max_new_tokens: int = 256  # generation length cap per prompt
    after_train: bool = True  # run eval when training finishes
    limit: int | None = None  # evaluate at most this many prompts; null = all
    batch_size: int = 64  # prompts generated together: on CPU the LM head costs as much for 100 rows as for 50


@dataclass
class Config:
    model: str = "smollm2-135m"  # embedded default | local HF dir | hub id
    method: Literal["lora", "qlora", "auto"] = "lora"  # qlora = lora on a 4-bit base (see quant)
    output_dir: str = "runs/example"  # the run directory
    seed: int = 42  # seeds data order, adapter init and dropout
    trust_remote_code: bool = False  # allow model code from the hub to run
    allow_pickle: bool = False  # load pickle weights (.bin/.pt) with torch.load(weights_only=True); else safetensors only
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    quant: QuantConfig = field(default_factory=QuantConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_REPR = reprlib.Repr()  # problem values shown whole up to 80 characters
_REPR.maxstring = _REPR.maxother = 80


@dataclass
class Problem:
    """One thing wrong with the config: the key as written, the bad value, what is wrong, the fix."""

    key: str
    value: object
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message} (got {_REPR.repr(self.value)}). Fix: {self.fix}"


class ConfigError(LorakitError):
    """Every problem found in a config; `str()` is the message shown to the user."""

    def __init__(self, problems: list[Problem], source: str = "config"):
        self.problems = problems
        self.source = source
        count = f"{len(problems)} problem" + ("" if len(problems) == 1 else "s")
        super().__init__("\n".join([f"{source}: {count}"] + [f"  {p}" for p in problems]))


@dataclass(frozen=True)
class _Range:
    """Allowed numbers: above `low` (inclusive unless low_open), below `high` (exclusive)."""

    low: float
    low_open: bool = False
    high: float | None = None

    def allows(self, v: float) -> bool:
        above = v > self.low if self.low_open else v >= self.low
        return above and (self.high is None or v < self.high)

    def __str__(self) -> str:
        text = f"{'>' if self.low_open else '>='} {self.low:g}"
        return text if self.high is None else f"{text} and < {self.high:g}"


_AT_LEAST_1 = _Range(1)
_POSITIVE = _Range(0, low_open=True)
_FRACTION = _Range(0, high=1)

# Checked only on numbers, so null and "auto" pass where the type allows them.
_RANGES = {
    "seed": _Range(0),
    "data.eval_split": _FRACTION,
    "data.max_length": _Range(16),
    "lora.r": _AT_LEAST_1,
    "lora.alpha": _POSITIVE,
    "lora.dropout": _FRACTION,
    "quant.dequant_cache": _Range(0),
    "train.epochs": _POSITIVE,
    "train.max_steps": _AT_LEAST_1,
    "train.batch_size": _AT_LEAST_1,
    "train.grad_accum": _AT_LEAST_1,
    "train.lr": _POSITIVE,
    "train.warmup_ratio": _FRACTION,
    "train.weight_decay": _Range(0),
    "train.max_grad_norm": _POSITIVE,
    "train.save_every": _AT_LEAST_1,
    "train.keep_checkpoints": _AT_LEAST_1,
    "train.eval_every": _AT_LEAST_1,
    "train.log_every": _AT_LEAST_1,
    "train.max_bad_steps": _Range(0),
    "eval.max_new_tokens": _AT_LEAST_1,
    "eval.limit": _AT_LEAST_1,
    "eval.batch_size": _AT_LEAST_1,
}

# Relative paths in these keys resolve against the config file's directory (or the current
# directory when given as an override); output_dir always resolves against the current directory.
_PATH_KEYS = ("data.train", "data.eval", "data.template", "eval.prompts")


def _leaves(cls: type, prefix: str = "") -> dict[str, tuple[object, object]]:
    """Every settable dotted key under `cls` -> (type hint, default value)."""
    hints, defaults = get_type_hints(cls), cls()
    out: dict[str, tuple[object, object]] = {}
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            out.update(_leaves(hints[f.name], f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = (hints[f.name], getattr(defaults, f.name))
    return out


_FIELDS = _leaves(Config)
_SECTIONS = [f.name for f in fields(Config) if is_dataclass(get_type_hints(Config)[f.name])]


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] | Mapping[str, object] = (),
    *,
    require_train: bool = True,
) -> Config:
    """Read the YAML at `path` (None: defaults only), apply overrides, validate, return the Config.

    Overrides are `section.key=value` strings (value parsed as YAML) or a mapping of dotted key to
    value. Raises ConfigError listing every problem; `require_train=False` allows no data.train.
    """
    source = str(path) if path is not None else "config"
    given = _read_yaml(Path(path), source) if path is not None else {}
    problems: list[Problem] = []
    values = _flatten(given, problems)
    cli = _parse_overrides(overrides, problems)
    values = _check_values({**values, **cli}, problems)
    if require_train and "data.train" in values and not values["data.train"]:
        problems.append(Problem("data.train", values["data.train"], "data.train is required",
                                "set data.train to a .jsonl file, glob or list, or pass data.train=PATH"))
    if problems:
        raise ConfigError(problems, source)
    file_dir = Path(path).parent if path is not None else Path.cwd()
    return _build(Config, _resolve_paths(values, file_dir, set(cli)))


def config_to_dict(cfg: Config) -> dict:
    """The config as a plain nested dict with every key filled in."""
    return asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the config as YAML (every key, in declaration order); load_config reads it back equal."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _read_yaml(path: Path, source: str) -> dict:
    """The file's top-level mapping ({} for an empty file); ConfigError if missing or not YAML."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        fix = "check the path, or run `lorakit init DIR` for a starter config"
        raise ConfigError([Problem("config", str(path), "file not found", fix)], source) from None
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(exc, path, raw)], source) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        fix = "start the file with `key: value` lines, e.g. `model: smollm2-135m`"
        raise ConfigError([Problem("config", data, "the top level must be a mapping of keys to values", fix)], source)
    return data


def _yaml_problem(exc: yaml.YAMLError, path: Path, raw: bytes) -> Problem:
    """Name the file and line yaml stopped at, with that line's text as the value."""
    mark = exc.problem_mark if isinstance(exc, yaml.MarkedYAMLError) else None
    if mark is None:
        return Problem(str(path), None, f"not valid YAML: {exc}", "fix the YAML syntax")
    lines = raw.decode("utf-8", errors="replace").splitlines()
    text = lines[mark.line] if mark.line < len(lines) else ""
    where = f"{path}:{mark.line + 1}"
    return Problem(where, text, f"not valid YAML: {exc.problem}", f"fix the YAML syntax at {where}")


def _flatten(given: dict, problems: list[Problem]) -> dict[str, object]:
    """The file's values keyed by dotted name; unknown keys and non-mapping sections become problems."""
    values: dict[str, object] = {}
    for key, value in given.items():
        key = str(key)
        if key not in _SECTIONS:
            _set_known(key, value, values, problems)
        elif isinstance(value, dict):
            for sub, sub_value in value.items():
                _set_known(f"{key}.{sub}", sub_value, values, problems)
        elif value is not None:  # `eval:` with every key commented out reads as null: no settings
            problems.append(Problem(key, value, "a section must be a mapping of keys to values",
                                    f"put its `key: value` lines indented under `{key}:`"))
    return values


def _parse_overrides(
    overrides: Sequence[str] | Mapping[str, object], problems: list[Problem]
) -> dict[str, object]:
    """Overrides keyed by dotted name; bad syntax and unknown keys become problems."""
    if isinstance(overrides, Mapping):
        pairs = list(overrides.items())
    else:
        pairs = []
        for text in overrides:
            key, sep, value = text.partition("=")
            if not sep:
                problems.append(Problem("override", text, "not of the form section.key=value",
                                        "write it as e.g. `train.lr=2e-4` (no spaces around =)"))
                continue
            pairs.append((key.strip(), _parse_value(value)))
    values: dict[str, object] = {}
    for key, value in pairs:
        _set_known(key, value, values, problems)
    return values


def _parse_value(text: str) -> object:
    """An override value as YAML; text YAML cannot read stays a string (a glob like `*.jsonl`)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_known(key: str, value: object, values: dict[str, object], problems: list[Problem]) -> None:
    if key in _FIELDS:
        values[key] = value
    else:
        problems.append(Problem(key, value, "unknown key", _suggest_key(key)))


def _suggest_key(key: str) -> str:
    """'did you mean' for an unknown dotted key: same name in another section, else a close spelling."""
    leaf = key.rsplit(".", 1)[-1]
    matches = [k for k in _FIELDS if k.rsplit(".", 1)[-1] == leaf]
    matches = matches or difflib.get_close_matches(key, [*_FIELDS, *_SECTIONS], n=1, cutoff=0.6)
    if matches:
        return "did you mean " + " or ".join(f"`{m}`" for m in matches) + "?"
    section = key.split(".", 1)[0]
    if "." in key and section in _SECTIONS:
        valid = [k.split(".", 1)[1] for k in _FIELDS if k.startswith(section + ".")]
        return f"remove it; the keys in {section} are: " + ", ".join(valid)
    valid = [k for k in _FIELDS if "." not in k] + _SECTIONS
    return "remove it; the top-level keys are: " + ", ".join(valid)


def _check_values(given: dict[str, object], problems: list[Problem]) -> dict[str, object]:
    """Every key: the given value converted to its field type, else the default.

    Values of the wrong type or out of range become problems and are left out of the result.
    """
    values: dict[str, object] = {}
    for key, (tp, default) in _FIELDS.items():
        if key not in given:
            values[key] = copy.deepcopy(default)
            continue
        try:
            value = _coerce(given[key], tp)
        except _Mismatch:
            problems.append(_type_problem(key, given[key], tp, default))
            continue
        rng = _RANGES.get(key)
        if rng and _is_number(value) and not rng.allows(value):
            problems.append(Problem(key, value, f"must be {rng}",
                                    f"set {key} to a value {rng}, e.g. the default {_yaml_text(default)}"))
            continue
        values[key] = value
    return values


class _Mismatch(Exception):
    """A value does not fit a type hint."""


def _coerce(value: object, tp: object) -> object:
    """`value` as type `tp`: ints widen to float and numeric strings (yaml reads `1e-4` as one)
    parse as float; bools are never numbers. Raises _Mismatch."""
    origin = get_origin(tp)
    if origin is Literal:
        if any(type(value) is type(c) and value == c for c in get_args(tp)):
            return value
    elif origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg)
            except _Mismatch:
                pass
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(v, get_args(tp)[0]) for v in value]
    elif origin is dict:
        key_tp, value_tp = get_args(tp)
        if isinstance(value, dict):
            return {_coerce(k, key_tp): _coerce(v, value_tp) for k, v in value.items()}
    elif tp is float:
        if _is_number(value):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is type(None):
        if value is None:
            return None
    elif isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise _Mismatch


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_problem(key: str, value: object, tp: object, default: object) -> Problem:
    allowed = _describe(tp)
    close = difflib.get_close_matches(value, _choices(tp), n=1, cutoff=0.6) if isinstance(value, str) else []
    if close:
        fix = f"did you mean {close[0]!r}?"
    else:
        fix = f"set {key} to {allowed}, e.g. the default {_yaml_text(default)}"
    return Problem(key, value, f"must be {allowed}", fix)


_NAMES = {str: ("a string", "strings"), int: ("an integer", "integers"), float: ("a number", "numbers"),
          bool: ("true or false", "booleans"), type(None): ("null", "nulls")}


def _describe(tp: object, plural: bool = False) -> str:
    """What a type hint allows, in words: "an integer or 'auto'", "one of 'lora', 'qlora'"."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = ", ".join(repr(c) for c in get_args(tp))
        return choices if len(get_args(tp)) == 1 else f"one of {choices}"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in get_args(tp))
    if origin is list:
        return f"a list of {_describe(get_args(tp)[0], plural=True)}"
    if origin is dict:
        key_tp, value_tp = get_args(tp)
        return f"a mapping of {_describe(key_tp, True)} to {_describe(value_tp, True)}"
    return _NAMES[tp][plural]


def _choices(tp: object) -> list[str]:
    """The string choices of every Literal in a type hint."""
    if get_origin(tp) is Literal:
        return [c for c in get_args(tp) if isinstance(c, str)]
    return [c for arg in get_args(tp) for c in _choices(arg)]


def _resolve_paths(values: dict[str, object], file_dir: Path, cli_keys: set[str]) -> dict[str, object]:
    """Path keys made absolute: from the file against its directory, from overrides against the cwd."""
    cwd = Path.cwd()
    resolved = dict(values)
    for key in _PATH_KEYS:
        resolved[key] = _absolute(values[key], cwd if key in cli_keys else file_dir)
    resolved["output_dir"] = _absolute(values["output_dir"], cwd)
    return resolved


def _absolute(value: str | list[str] | None, base: Path) -> str | list[str] | None:
    """Absolute path string(s); `~` expands, `..` collapses, symlinks and globs are kept as written."""
    if value is None:
        return None
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    return os.path.abspath(os.path.join(base, os.path.expanduser(value)))


def _build(cls: type, values: dict[str, object], prefix: str = ""):
    """An instance of the dataclass `cls` (nested sections included) from dotted values."""
    hints = get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        kwargs[f.name] = _build(tp, values, key + ".") if is_dataclass(tp) else values[key]
    return cls(**kwargs)


def _yaml_text(value: object) -> str:
    """A value as it would be written in the YAML file."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()
