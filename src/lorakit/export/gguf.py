"""`lorakit export --gguf`: the merged model as one GGUF file for llama.cpp and Ollama, written with the
`gguf` Python package (no llama.cpp build, no network), then loaded back and checked.

Supported: llama-family decoders (llama, mistral, qwen2, qwen3; SmolLM2 is llama) with byte-level BPE
tokenizers, which llama.cpp calls "gpt2". Tensor names come from gguf's own name map; metadata keys are
the ones llama.cpp reads.
"""

import contextlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lorakit import console
from lorakit.errors import LorakitError
from lorakit.export import ollama
from lorakit.export.merge import Run, VerifyFailed, adds_bos, check_prompts, logits, max_diff, merge_verified, open_run

QUANTS = ("f16", "bf16", "q8_0")

# The check loads the file back and compares it with the merged model whose weights were rounded to
# exactly the values the file stores (f16/bf16 casts, q8_0 blocks dequantized), so both compute with the
# same numbers and any difference is lorakit's: a tensor laid out wrong, a wrong rope base or norm
# epsilon, a lost tensor. Measured: 0.0 on SmolLM2-135M for every quant; an unpermuted Q/K gives 30.
# The tolerance is the fp32 merge's (merge.py). What quantization itself costs, against the unrounded
# merged model, is reported, not judged (SmolLM2-135M: f16 0.05, bf16 0.30, q8_0 1.5).
TOLERANCE = 1e-3
GREEDY_TOKENS = 16  # new tokens per prompt in the greedy comparison

# llama.cpp arch for each transformers model_type, and whether it wants Q/K rows permuted: its "llama"
# arch applies rotary embeddings to interleaved pairs, Hugging Face's llama code to the two halves.
ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}

# llama.cpp picks its pre-tokenizer (how text is split before BPE) by name, tokenizer.ggml.pre. We name
# the one whose split is the tokenizer's own, matched on the pre_tokenizer of its tokenizer.json.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_REGEXES = {"llama-bpe": _LLAMA3, "qwen2": _QWEN2, "tekken": _TEKKEN}


@dataclass
class ExportResult:
    path: Path
    modelfile: Path
    quant: str
    max_logit_diff: float  # loaded back vs the merged model rounded as stored: lorakit's error
    quantization_effect: float  # loaded back vs the merged model in fp32: what the quant costs
    seconds: float


def export_gguf(run_dir: str | Path, out: str | Path, quant: str = "f16") -> ExportResult:
    """Merge RUN_DIR's adapter, write `out` (GGUF, `quant`) and an Ollama Modelfile next to it, load the
    file back through transformers and check logits and greedy output against the merged model;
    raises VerifyFailed (and keeps no file) when they differ."""
    started = time.time()
    out = Path(out)
    if quant not in QUANTS:
        raise LorakitError(f"--quant {quant!r} is not supported; choose one of {', '.join(QUANTS)}.")
    if not out.parent.is_dir() or out.is_dir():
        raise LorakitError(f"--out {out}: give a file name in an existing folder, e.g. {out.parent / 'model.gguf'}.")
    run = open_run(run_dir)
    arch, permute = _arch(_model_config(run))
    pre = pre_tokenizer_name(run.tokenizer)  # all checks on the input done before any weight is loaded
    merged = merge_verified(run, "fp32").model
    prompts = check_prompts(run)
    unrounded = logits(merged, prompts)
    tmp = out.with_name(f".{out.stem}.tmp.gguf")
    try:
        write_gguf(merged, run, tmp, quant=quant, arch=arch, permute=permute, pre=pre)
        round_to_stored(merged, quant)
        diff, effect = verify(tmp, merged, run, prompts, unrounded)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    modelfile = ollama.write_modelfile(run.tokenizer, out, run.stop_ids)
    result = ExportResult(out, modelfile, quant, diff, effect, time.time() - started)
    console.info(f"wrote {out} ({quant}, {out.stat().st_size / 2**20:.0f} MiB) and {modelfile.name}. Loaded back, it "
                 f"matches the merged model as stored (largest logit difference {diff:.2g}, greedy output identical "
                 f"on {len(prompts)} prompts); {quant} itself moves logits by up to {effect:.2g} "
                 f"({result.seconds:.0f}s). Run it: ollama create NAME -f {modelfile}")
    return result


def _model_config(run: Run):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(run.model_path, trust_remote_code=run.cfg.trust_remote_code)


def _arch(config) -> tuple[str, bool]:
    """llama.cpp arch name and Q/K permutation for `config`; raises for what lorakit cannot write."""
    if config.model_type not in ARCHS:
        raise LorakitError(f"GGUF export supports model types {', '.join(ARCHS)}; this model is "
                           f"{config.model_type!r}. Merge it (lorakit merge) and convert with llama.cpp's "
                           f"convert_hf_to_gguf.py, or serve the adapter with vLLM (docs/export.md).")
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type != "default":
        raise LorakitError(f"GGUF export does not write rope scaling yet; this model uses {rope_type!r}. "
                           f"Merge it (lorakit merge) and convert with llama.cpp's convert_hf_to_gguf.py.")
    if config.model_type == "mistral" and config.sliding_window:
        raise LorakitError(f"GGUF export does not write sliding-window attention (sliding_window="
                           f"{config.sliding_window}); merge the model and convert it with llama.cpp.")
    return ARCHS[config.model_type]


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer; raises unless it is byte-level BPE we know."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    name = _split_name(steps) if spec["model"]["type"] == "BPE" else None
    if name is None:
        raise LorakitError("GGUF export writes byte-level BPE tokenizers (Llama 3, Qwen2/3, SmolLM2, Mistral Nemo); "
                           f"this one is {spec['model']['type']} with pre-tokenizer {[s.get('type') for s in steps]}. "
                           "Merge the model (lorakit merge) and convert it with llama.cpp's convert_hf_to_gguf.py.")
    return name


def _split_name(steps: list[dict]) -> str | None:
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0]["use_regex"]:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0]["individual_digits"] and steps[1]["use_regex"]:
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1]["use_regex"]:
        regex = steps[0]["pattern"].get("Regex")
        return next((name for name, known in SPLIT_REGEXES.items() if known == regex), None)
    return None


def write_gguf(model, run: Run, path: Path, *, quant: str, arch: str, permute: bool, pre: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(run.path.resolve().name)
    writer.add_type(gguf.GGUFType.MODEL)
    _add_hparams(writer, model.config)
    _add_tokenizer(writer, run, pre, model.config.vocab_size)
    file_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, data, raw_dtype in _tensors(model, arch, permute, quant):
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_hparams(writer, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads  # Qwen2 has none
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def _add_tokenizer(writer, run: Run, pre: str, vocab_size: int) -> None:
    tok = run.tokenizer
    tokens, types = vocab_table(tok, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(bpe_merges(tok))
    for add, token_id in ((writer.add_bos_token_id, tok.bos_token_id), (writer.add_eos_token_id, tok.eos_token_id),
                          (writer.add_unk_token_id, tok.unk_token_id), (writer.add_pad_token_id, tok.pad_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_eot_token_id(run.stop_ids[0])  # the template's end of turn: llama.cpp stops on it
    writer.add_add_bos_token(adds_bos(tok))
    writer.add_chat_template(tok.chat_template)


def vocab_table(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings by id and llama.cpp token types: special added tokens are CONTROL, other added
    tokens USER_DEFINED, ids the tokenizer lacks (embedding rows past its vocabulary) UNUSED pads."""
    from gguf import TokenType

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    return tokens, types


def bpe_merges(tokenizer) -> list[str]:
    """The merges as "left right" strings; tokenizer.json stores them as strings or as pairs."""
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _tensors(model, arch: str, permute: bool, quant: str):
    """(gguf name, data, raw type) per tensor; the tied output head is left out as llama.cpp expects."""
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, model.config.num_hidden_layers)
    config = model.config
    for hf_name, tensor in _stored_tensors(model):
        stem, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(stem)
        if name is None:
            raise LorakitError(f"GGUF export: no llama.cpp name for tensor {hf_name} of this {config.model_type} model.")
        data, raw_dtype = _encode(tensor.detach().float().numpy(), quant)
        if permute and name.endswith((".attn_q", ".attn_k")):  # rows move whole, so quantized rows can too
            heads = config.num_attention_heads if name.endswith(".attn_q") else config.num_key_value_heads
            data = interleave_rotary(data, heads)
        yield f"{name}.{suffix}", data, raw_dtype


def _stored_tensors(model):
    tied = model.config.tie_word_embeddings
    return [(n, t) for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight")]


def interleave_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's rows from halves (x0..x_{d/2-1}, y0..) to pairs (x0, y0, x1, y1, ...), the
    layout llama.cpp's llama arch rotates. transformers' GGUF loader undoes exactly this."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(data: np.ndarray, quant: str):
    """The tensor as stored: vectors (norms, biases) stay fp32, as llama.cpp keeps them; matrices in
    `quant` (q8_0 needs rows in blocks of 32; other rows fall back to f16, as llama.cpp does)."""
    import gguf

    kind = gguf.GGMLQuantizationType
    if data.ndim == 1:
        return data, None
    if quant == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[kind.Q8_0][0] == 0:
        return gguf.quants.quantize(data, kind.Q8_0), kind.Q8_0
    if quant == "bf16":
        return gguf.quants.quantize(data, kind.BF16), kind.BF16
    return data.astype(np.float16), None


@torch.no_grad()
def round_to_stored(model, quant: str) -> None:
    """Set every weight of `model` to the value the GGUF stores for it (what a reader dequantizes)."""
    import gguf

    for _, tensor in _stored_tensors(model):
        data, raw_dtype = _encode(tensor.float().numpy(), quant)
        stored = gguf.quants.dequantize(data, raw_dtype) if raw_dtype is not None else data.astype(np.float32)
        tensor.copy_(torch.from_numpy(stored.reshape(tensor.shape)))


def verify(path: Path, stored, run: Run, prompts: list[torch.Tensor], unrounded: list[torch.Tensor]):
    """Load the file back through transformers' GGUF loader; compare its tokenizer with the run's, and its
    logits and greedy continuations with `stored` (the merged model rounded as the file stores it).
    Returns (largest logit difference, the same against the unrounded logits); raises VerifyFailed."""
    from transformers import AutoModelForCausalLM

    _verify_tokenizer(path, run, prompts)
    with contextlib.redirect_stderr(io.StringIO()):  # the loader's own progress bar (plain tqdm)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    found = logits(loaded, prompts)
    diff = max_diff(found, logits(stored, prompts))
    if not diff <= TOLERANCE:  # `not <=` also catches NaN
        raise VerifyFailed(f"the GGUF loaded back differs from the merged model by {diff:.3g} in logits (tolerance "
                           f"{TOLERANCE:g}); the file was not kept. This is a lorakit bug: please report it.")
    mismatches = sum(not _decodes_alike(loaded, stored, ids, run) for ids in prompts)
    if mismatches:
        raise VerifyFailed(f"the GGUF loaded back generates other text than the merged model on {mismatches} of "
                           f"{len(prompts)} check prompts; the file was not kept.")
    return diff, max_diff(found, unrounded)


@torch.no_grad()
def _decodes_alike(loaded, stored, ids: torch.Tensor, run: Run) -> bool:
    """Whether greedy decoding with `loaded` gives `stored`'s continuation: `loaded`'s argmax after each
    prefix of it (one teacher-forced pass, not a second generation) must be its next token."""
    out = stored.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=GREEDY_TOKENS, eos_token_id=run.stop_ids,
                          pad_token_id=run.tokenizer.pad_token_id)
    continuation = out[0, ids.shape[1]:]
    predicted = loaded(input_ids=out).logits[0, ids.shape[1] - 1:-1].argmax(-1)
    return torch.equal(predicted, continuation)


def _verify_tokenizer(path: Path, run: Run, prompts: list[torch.Tensor]) -> None:
    """The tokenizer rebuilt from the file's tokens, merges and special tokens must tokenize the check
    prompts as the run's tokenizer does, and keep its special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    # Not AutoTokenizer: it would parse the whole file once more only to read the config.
    with contextlib.redirect_stderr(io.StringIO()):
        loaded = PreTrainedTokenizerFast.from_pretrained(path.parent, gguf_file=path.name)
    tok = run.tokenizer
    texts = [tok.decode(ids[0]) for ids in prompts]
    wrong = [name for name, same in (
        ("token ids of the check prompts", all(loaded(t)["input_ids"] == tok(t)["input_ids"] for t in texts)),
        ("eos token", loaded.eos_token == tok.eos_token), ("bos token", loaded.bos_token == tok.bos_token),
        ("chat template", loaded.chat_template == tok.chat_template)) if not same]
    if wrong:
        raise VerifyFailed(f"the tokenizer read back from the GGUF differs from the run's in: {', '.join(wrong)}; "
                           f"the file was not kept.")
