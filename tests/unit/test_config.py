import pytest
import yaml

from lorakit.config import Config, ConfigError, config_to_dict, dump_config, load_config
from lorakit.errors import LorakitError


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def problem_keys(exc_info):
    return [p.key for p in exc_info.value.problems]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_defaults_match_design(tmp_path):
    cfg = load_config(require_train=False)
    assert config_to_dict(cfg) == {
        "model": "smollm2-135m",
        "method": "lora",
        "output_dir": str(tmp_path / "runs" / "example"),
        "seed": 42,
        "trust_remote_code": False,
        "allow_pickle": False,
        "data": {
            "train": None,
            "eval": None,
            "eval_split": 0.0,
            "format": "auto",
            "columns": {},
            "template": None,
            "max_length": 1024,
            "too_long": "error",
            "loss_on": "assistant",
            "packing": True,
        },
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "quant": {"type": "nf4", "double_quant": True, "compute_dtype": "auto", "dequant_cache": "auto"},
        "train": {
            "epochs": 1,
            "max_steps": None,
            "batch_size": 8,
            "grad_accum": 1,
            "lr": 1.0e-4,
            "scheduler": "cosine",
            "warmup_ratio": 0.03,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "precision": "auto",
            "gradient_checkpointing": "auto",
            "compile": True,
            "fp8": False,
            "save_every": 200,
            "keep_checkpoints": 2,
            "eval_every": 200,
            "log_every": 10,
            "max_bad_steps": 3,
            "distributed": "auto",
        },
        "eval": {"prompts": None, "max_new_tokens": 256, "after_train": True, "limit": None, "batch_size": 64},
    }


def test_empty_file_gives_defaults(tmp_path):
    path = write(tmp_path / "empty.yaml", "")
    assert load_config(path, require_train=False) == load_config(require_train=False)


def test_data_train_required_unless_told_otherwise():
    with pytest.raises(ConfigError, match="data.train is required") as exc_info:
        load_config()
    assert problem_keys(exc_info) == ["data.train"]
    assert load_config(require_train=False).data.train is None


def test_overrides_win_over_file_which_wins_over_defaults(tmp_path):
    path = write(tmp_path / "c.yaml", "data: {train: t.jsonl}\ntrain:\n  lr: 3.0e-4\n  max_steps: 10\n")
    cfg = load_config(path, ["train.lr=2e-4"])
    assert cfg.train.lr == 2e-4
    assert cfg.train.max_steps == 10
    assert cfg.train.grad_accum == 1


def test_mapping_overrides_for_python_api():
    cfg = load_config(overrides={"train.max_steps": 5, "seed": 7}, require_train=False)
    assert (cfg.train.max_steps, cfg.seed) == (5, 7)


@pytest.mark.parametrize(
    "override, attr, expected",
    [
        ("train.lr=2.0e-4", ("train", "lr"), 2e-4),
        ("train.lr=1e-4", ("train", "lr"), 1e-4),  # yaml reads `1e-4` as a string
        ("data.eval=null", ("data", "eval"), None),
        ("lora.target_modules=[q_proj,v_proj]", ("lora", "target_modules"), ["q_proj", "v_proj"]),
        ("data.packing=false", ("data", "packing"), False),
        ("train.gradient_checkpointing=true", ("train", "gradient_checkpointing"), True),
        ("train.batch_size=auto", ("train", "batch_size"), "auto"),
        ("train.batch_size=4", ("train", "batch_size"), 4),
        ("data.columns={prompt: question}", ("data", "columns"), {"prompt": "question"}),
    ],
)
def test_override_values_are_typed(override, attr, expected):
    cfg = load_config(overrides=[override], require_train=False)
    value = getattr(getattr(cfg, attr[0]), attr[1])
    assert value == expected
    assert type(value) is type(expected)


def test_float_field_accepts_int_and_exponent_string_from_file(tmp_path):
    path = write(tmp_path / "c.yaml", "lora: {alpha: 16}\ntrain: {lr: 1e-4}\n")
    cfg = load_config(path, require_train=False)
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.lora.alpha == 16.0 and isinstance(cfg.lora.alpha, float)


def test_paths_in_file_resolve_against_its_directory(tmp_path, monkeypatch):
    conf_dir = tmp_path / "project" / "configs"
    path = write(
        conf_dir / "c.yaml",
        "output_dir: runs/x\n"
        "data:\n  train: [data/a.jsonl, 'data/*.jsonl', /abs/b.jsonl]\n  eval: ../eval.jsonl\n"
        "  template: chat.jinja\n"
        "eval: {prompts: prompts.jsonl}\n",
    )
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cfg = load_config(path)
    assert cfg.data.train == [str(conf_dir / "data/a.jsonl"), str(conf_dir / "data/*.jsonl"), "/abs/b.jsonl"]
    assert cfg.data.eval == str(tmp_path / "project" / "eval.jsonl")
    assert cfg.data.template == str(conf_dir / "chat.jinja")
    assert cfg.eval.prompts == str(conf_dir / "prompts.jsonl")
    assert cfg.output_dir == str(cwd / "runs" / "x")


def test_paths_in_overrides_resolve_against_cwd(tmp_path, monkeypatch):
    path = write(tmp_path / "configs" / "c.yaml", "data: {train: in_file.jsonl, eval: e.jsonl}\n")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cfg = load_config(path, ["data.train=*.jsonl", "eval.prompts=p.jsonl"])
    assert cfg.data.train == str(cwd / "*.jsonl")
    assert cfg.eval.prompts == str(cwd / "p.jsonl")
    assert cfg.data.eval == str(tmp_path / "configs" / "e.jsonl")


def test_three_mistakes_reported_together(tmp_path):
    path = write(
        tmp_path / "config.yaml",
        "method: qlor\ndata: {train: t.jsonl}\nlora:\n  dropout: 1.5\ntrain:\n  alpha: 64\n",
    )
    with pytest.raises(ConfigError) as exc_info:
        load_config(path)
    by_key = {p.key: p for p in exc_info.value.problems}
    assert sorted(by_key) == ["lora.dropout", "method", "train.alpha"]
    assert by_key["train.alpha"].value == 64
    assert "lora.alpha" in by_key["train.alpha"].fix
    assert by_key["method"].value == "qlor"
    assert "'lora', 'qlora', 'auto'" in by_key["method"].message
    assert "'qlora'" in by_key["method"].fix
    assert by_key["lora.dropout"].value == 1.5
    assert ">= 0 and < 1" in by_key["lora.dropout"].message

    lines = str(exc_info.value).splitlines()
    assert lines[0] == f"{path}: 3 problems"
    assert len(lines) == 4
    for line, problem in zip(lines[1:], exc_info.value.problems):
        assert problem.key in line and repr(problem.value) in line and problem.fix in line


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("train.alpha=8", "`lora.alpha`"),
        ("lora.rank=8", "`lora.r`"),
        ("trian.lr=1e-4", "`train.lr`"),
        ("train.seed=1", "`seed`"),
    ],
)
def test_unknown_override_key_suggests_the_right_one(override, suggestion):
    with pytest.raises(ConfigError) as exc_info:
        load_config(overrides=[override], require_train=False)
    (problem,) = exc_info.value.problems
    assert problem.key == override.split("=")[0]
    assert problem.message == "unknown key"
    assert problem.fix == f"did you mean {suggestion}?"


def test_unknown_section_in_file_suggests_section(tmp_path):
    path = write(tmp_path / "c.yaml", "trian:\n  lr: 1.0e-4\n")
    with pytest.raises(ConfigError) as exc_info:
        load_config(path, require_train=False)
    (problem,) = exc_info.value.problems
    assert (problem.key, problem.fix) == ("trian", "did you mean `train`?")


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ConfigError) as exc_info:
        load_config(overrides=["quant.zzzzzz=1"], require_train=False)
    assert exc_info.value.problems[0].fix == "remove it; the keys in quant are: type, double_quant, compute_dtype, dequant_cache"


def test_section_that_is_not_a_mapping(tmp_path):
    path = write(tmp_path / "c.yaml", "lora: 8\neval:\n")
    with pytest.raises(ConfigError) as exc_info:
        load_config(path, require_train=False)
    (problem,) = exc_info.value.problems  # `eval:` left empty is fine
    assert (problem.key, problem.value) == ("lora", 8)
    assert "mapping" in problem.message


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("seed", "abc", "must be an integer"),
        ("lora.r", True, "must be an integer"),  # a bool is not an int
        ("train.grad_accum", 2.0, "must be an integer"),
        ("train.lr", "abc", "must be a number"),
        ("train.epochs", False, "must be a number"),
        ("data.packing", "yes", "must be true or false"),
        ("data.packing", 1, "must be true or false"),
        ("train.batch_size", True, "must be an integer or 'auto'"),
        ("lora.target_modules", 5, "must be a string or a list of strings"),
        ("lora.target_modules", ["q_proj", 3], "must be a string or a list of strings"),
        ("data.columns", {"prompt": 1}, "must be a mapping of strings to strings"),
        ("model", None, "must be a string"),
    ],
)
def test_wrong_types_are_rejected(key, value, allowed):
    with pytest.raises(ConfigError) as exc_info:
        load_config(overrides={key: value}, require_train=False)
    (problem,) = exc_info.value.problems
    assert (problem.key, problem.value, problem.message) == (key, value, allowed)


def test_wrong_type_fix_names_allowed_values_and_default():
    with pytest.raises(ConfigError) as exc_info:
        load_config(overrides=["train.warmup_ratio=lots"], require_train=False)
    assert exc_info.value.problems[0].fix == "set train.warmup_ratio to a number, e.g. the default 0.03"


def test_bad_choice_lists_values_and_suggests():
    with pytest.raises(ConfigError) as exc_info:
        load_config(overrides=["quant.compute_dtype=bf16", "train.scheduler=step"], require_train=False)
    dtype, scheduler = exc_info.value.problems
    assert dtype.message == "must be one of 'auto', 'bfloat16', 'float16', 'float32'"
    assert dtype.fix == "did you mean 'bfloat16'?"
    assert scheduler.message == "must be one of 'cosine', 'linear', 'constant'"
    assert scheduler.fix.startswith("set train.scheduler to one of")


@pytest.mark.parametrize(
    "key, good, bad",
    [
        ("seed", 0, -1),
        ("lora.r", 1, 0),
        ("lora.alpha", 0.5, 0),
        ("lora.dropout", 0.0, 1.0),
        ("train.lr", 1e-6, 0.0),
        ("train.epochs", 0.5, 0),
        ("train.max_steps", None, 0),
        ("train.batch_size", "auto", 0),
        ("train.grad_accum", 1, 0),
        ("train.warmup_ratio", 0.0, 1.0),
        ("train.weight_decay", 0.0, -0.1),
        ("train.max_grad_norm", None, 0.0),
        ("train.save_every", 1, 0),
        ("train.eval_every", 1, 0),
        ("train.log_every", 1, 0),
        ("train.keep_checkpoints", 1, 0),
        ("data.max_length", 16, 15),
        ("data.eval_split", 0.99, 1.0),
        ("eval.max_new_tokens", 1, 0),
        ("eval.limit", None, 0),
        ("eval.batch_size", 1, 0),
    ],
)
def test_ranges(key, good, bad):
    load_config(overrides={key: good}, require_train=False)
    with pytest.raises(ConfigError) as exc_info:
        load_config(overrides={key: bad}, require_train=False)
    (problem,) = exc_info.value.problems
    assert (problem.key, problem.value) == (key, bad)
    assert problem.message.startswith("must be >")


def test_bad_override_syntax():
    with pytest.raises(ConfigError) as exc_info:
        load_config(overrides=["train.lr", "seed=3"], require_train=False)
    (problem,) = exc_info.value.problems
    assert (problem.key, problem.value) == ("override", "train.lr")
    assert "section.key=value" in problem.message


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError) as exc_info:
        load_config(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(exc_info.value)
    assert "file not found" in str(exc_info.value)


def test_unparseable_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path / "c.yaml", "model: x\nseed: 1\ntrain: a: b\n")
    with pytest.raises(ConfigError) as exc_info:
        load_config(path)
    (problem,) = exc_info.value.problems
    assert problem.key == f"{path}:3"
    assert problem.value == "train: a: b"


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path / "c.yaml", "- model\n- seed\n")
    with pytest.raises(ConfigError) as exc_info:
        load_config(path)
    assert "top level must be a mapping" in exc_info.value.problems[0].message


def test_config_error_is_a_lorakit_error_with_exit_code_2():
    with pytest.raises(LorakitError) as exc_info:
        load_config()
    assert isinstance(exc_info.value, ConfigError)
    assert exc_info.value.exit_code == 2


def test_dump_then_load_round_trips(tmp_path, monkeypatch):
    src = write(
        tmp_path / "src" / "c.yaml",
        "method: qlora\nmodel: yes-model\n"
        "data: {train: [a.jsonl, 'b/*.jsonl'], template: t.jinja, columns: {prompt: q}}\n"
        "lora: {target_modules: [q_proj, v_proj], alpha: 16}\n"
        "train: {lr: 1e-4, batch_size: auto, max_steps: 3, gradient_checkpointing: true, max_grad_norm: null}\n"
        "eval: {limit: 5}\n",
    )
    cfg = load_config(src)
    out = tmp_path / "run" / "config.yaml"
    out.parent.mkdir()
    dump_config(cfg, out)
    assert set(yaml.safe_load(out.read_text())) == set(config_to_dict(Config()))
    monkeypatch.chdir(tmp_path / "src")  # paths are absolute: the cwd no longer matters
    assert load_config(out) == cfg
