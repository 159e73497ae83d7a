"""Loading someone else's model, data or template cannot run their code, write outside the run, or
leak the environment's secrets: no remote code unless trusted, no pickle unless allowed (then
weights_only), sandboxed and bounded chat templates, contained paths, no tokens in any artifact,
dataset text trained literally."""

import copy
import importlib.resources
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit import models
from lorakit.data import DataError, RenderError, read_examples, render
from lorakit.data.sandbox import render_chat

LORAKIT = [sys.executable, "-m", "lorakit.cli"]
TEMPLATES = sorted(p.name for p in (importlib.resources.files("trl") / "chat_templates").iterdir()
                   if p.name.endswith(".jinja"))
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}]


class Sentinel:
    """A pickle whose loading would create `path`: the proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    """A writable copy of the tiny model, to plant things in."""
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def _train_cfg(overfit_config, model_dir, tmp_path, *more):
    return lorakit.load_config(overfit_config, [f"model={model_dir}", f"output_dir={tmp_path / 'run'}",
                                                "train.max_steps=1", *more])


# --- remote code -------------------------------------------------------------------------------------


def test_remote_code_is_refused_unless_trusted(model_copy, overfit_config, tmp_path):
    sentinel = tmp_path / "ran"
    (model_copy / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').close()\n")
    config = json.loads((model_copy / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel", "AutoConfig": "evil.EvilConfig"}
    (model_copy / "config.json").write_text(json.dumps(config))
    assert lorakit.Config().trust_remote_code is False
    with pytest.raises(models.ModelError, match=r"config.json: `auto_map`.*trust_remote_code: true"):
        lorakit.train(_train_cfg(overfit_config, model_copy, tmp_path))
    assert not sentinel.exists()


# --- pickle weights ----------------------------------------------------------------------------------


def _to_pickle(model_dir, payload=None):
    weights = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    torch.save(weights if payload is None else payload, model_dir / "pytorch_model.bin")


def test_pickle_weights_are_refused_by_name(model_copy, overfit_config, tmp_path):
    sentinel = tmp_path / "ran"
    _to_pickle(model_copy, {"w": Sentinel(sentinel)})
    result = subprocess.run([*LORAKIT, "train", str(overfit_config), f"model={model_copy}",
                             f"output_dir={tmp_path / 'run'}"], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert "pytorch_model.bin: weights in pickle format" in message and "safetensors" in message
    assert "allow_pickle: true" in message and "Traceback" not in message
    assert not sentinel.exists()


def test_allow_pickle_still_refuses_code_in_the_pickle(model_copy, overfit_config, tmp_path):
    sentinel = tmp_path / "ran"
    _to_pickle(model_copy, {"w": Sentinel(sentinel)})
    with pytest.raises(models.ModelError, match="holds more than tensors"):
        lorakit.train(_train_cfg(overfit_config, model_copy, tmp_path, "allow_pickle=true"))
    assert not sentinel.exists()  # torch.load(weights_only=True) refused the payload


def test_allow_pickle_trains_from_plain_tensors(tiny_model_dir, overfit_config, tmp_path):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "pickled")
    _to_pickle(model_dir)
    result = lorakit.train(_train_cfg(overfit_config, model_dir, tmp_path, "allow_pickle=true"))
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_shard_index_naming_files_outside_the_model_is_refused(model_copy):
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "../../etc/passwd"}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(models.ModelError, match=r"weight_map names '../../etc/passwd', outside"):
        models.weight_loading(str(model_copy), allow_pickle=False)


# --- chat templates: sandboxed, bounded, and data is never a template ----------------------------------


@pytest.fixture(scope="module")
def any_template_tokenizer(smol_tokenizer):
    return copy.deepcopy(smol_tokenizer)


@pytest.mark.parametrize("name", TEMPLATES)
def test_sandboxed_rendering_is_what_transformers_renders(any_template_tokenizer, name):
    tok = any_template_tokenizer
    tok.chat_template = (importlib.resources.files("trl") / "chat_templates" / name).read_text()
    for messages, prompt in ((CHAT, True), (CHAT[1:3], False)):
        try:
            want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        except Exception as e:  # a template refusing the conversation must refuse it in the sandbox too
            with pytest.raises(type(e)):
                render_chat(tok, messages, None, prompt)
            continue
        assert render_chat(tok, messages, None, prompt) == want


ESCAPES = {
    "lipsum globals": "{{ lipsum.__globals__['os'].popen('touch SENTINEL') }}",
    "mro": "{{ ().__class__.__mro__[1].__subclasses__() }}",
    "cycler globals": "{{ cycler.__init__.__globals__.os.popen('touch SENTINEL') }}",
    "namespace dunder": "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
}
HUGE = {
    "repeat": "{{ 'x' * 1000000000 }}",
    "power": "{{ 10 ** 1000000000 }}",
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "filter width": "{{ 'x' | center(1000000000) }}",
    "method width": "{{ 'x'.ljust(1000000000) }}",
    "percent width": "{{ '%01000000000d' % 1 }}",
    "format width": "{{ '{:>1000000000}'.format(1) }}",
    "output": "{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}",
}


@pytest.mark.parametrize("template", list(ESCAPES.values()) + list(HUGE.values()), ids=[*ESCAPES, *HUGE])
def test_hostile_templates_fail_cleanly_and_quickly(smol_tokenizer, tmp_path, template):
    sentinel = tmp_path / "ran"
    template = template.replace("SENTINEL", str(sentinel))
    started = time.monotonic()
    with pytest.raises(RenderError, match="the chat template failed rendering"):
        render(smol_tokenizer, CHAT[1:3], template=template, source="train.jsonl:1")
    assert time.monotonic() - started < 5
    assert not sentinel.exists()


def test_a_hostile_template_file_stops_check_with_exit_2(smol_dir, tmp_path):
    (tmp_path / "evil.jinja").write_text(ESCAPES["lipsum globals"].replace("SENTINEL", str(tmp_path / "ran")))
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": CHAT[1:3]}) + "\n")
    result = subprocess.run([*LORAKIT, "check", str(tmp_path / "train.jsonl"), f"data.template={tmp_path / 'evil.jinja'}",
                             f"--model={smol_dir}"], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "chat template failed" in result.stderr and not (tmp_path / "ran").exists()


@pytest.mark.parametrize("text", ["{{ 7*7 }}", "{% for x in messages %}{{ x }}{% endfor %}", "{# c #} {%raw%}{{"])
def test_template_syntax_in_the_data_is_trained_literally(smol_tokenizer, text):
    rendered = render(smol_tokenizer, [{"role": "user", "content": text}, {"role": "assistant", "content": text}])
    trained = [t for t, label in zip(rendered.input_ids, rendered.labels) if label != -100]
    assert smol_tokenizer.decode(trained) == text + "<|im_end|>"
    assert text in smol_tokenizer.decode(rendered.input_ids)  # the prompt side too, unrendered


# --- paths stay inside ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../outside.arrow", "/etc/passwd", "sub/../../outside.arrow"])
def test_a_dataset_folder_naming_files_outside_it_is_refused(tmp_path, name):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": name}]}))
    with pytest.raises(DataError, match="not a file inside"):
        list(read_examples(folder))


def test_a_symlink_out_of_a_dataset_folder_is_refused(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "data.arrow").symlink_to("/etc/hostname")
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data.arrow"}]}))
    with pytest.raises(DataError, match="not a file inside"):
        list(read_examples(folder))


# --- secrets ----------------------------------------------------------------------------------------

CANARY = "lorakit-canary-7f3a9c1e"


def test_environment_secrets_never_reach_run_files_or_output(tiny_model_dir, overfit_config, tmp_path):
    env = {**os.environ, "HF_TOKEN": f"hf_{CANARY}", "OPENAI_API_KEY": f"sk-{CANARY}",
           "WANDB_API_KEY": f"w{CANARY}", "MY_SERVICE_SECRET": f"s{CANARY}", "HUB_TOKEN": f"h{CANARY}"}
    (tmp_path / "eval.jsonl").write_text((tmp_path / "train.jsonl").read_text())
    run = tmp_path / "run"
    result = subprocess.run([*LORAKIT, "train", str(overfit_config), f"model={tiny_model_dir}", f"output_dir={run}",
                             "train.max_steps=2", f"data.eval={tmp_path / 'eval.jsonl'}", "eval.after_train=true",
                             "eval.max_new_tokens=4", "eval.limit=2"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (run / "eval" / "summary.json").is_file()
    files = [p for p in run.rglob("*") if p.is_file()]
    assert len(files) > 10
    leaked = [str(p) for p in files if CANARY.encode() in p.read_bytes()]
    assert leaked == [] and CANARY not in result.stdout + result.stderr
