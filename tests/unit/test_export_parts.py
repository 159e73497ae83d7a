"""Export parts that need no trained run: GGUF layout and names, the Ollama template, request parsing."""

import copy
import json

import numpy as np
import pytest
from transformers import GPT2Config, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from lorakit.chat import _Session
from lorakit.errors import LorakitError
from lorakit.export import gguf as G
from lorakit.export.ollama import match_family, modelfile_text
from lorakit.serve import MAX_TOKENS, BadRequest, parse_request

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def test_rotary_interleave_is_what_transformers_gguf_loader_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    heads, kv_heads, head_dim, hidden = 9, 3, 64, 576  # SmolLM2-135M
    reader = LlamaTensorProcessor(config={"num_attention_heads": heads, "num_key_value_heads": kv_heads})
    for name, rows in (("blk.0.attn_q.weight", heads), ("blk.0.attn_k.weight", kv_heads)):
        w = np.random.default_rng(0).standard_normal((rows * head_dim, hidden)).astype(np.float32)
        back = reader.process(G.interleave_rotary(w, rows), name).weights
        assert np.array_equal(back, w)


def test_split_regexes_are_the_ones_transformers_reads_back_for_those_names():
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    for name, regex in G.SPLIT_REGEXES.items():
        assert GGUF_PRE_TOKENIZER_SPLITS[name] == regex, name


def test_pre_tokenizer_of_the_embedded_model_and_a_refusal_for_sentencepiece(smol_tokenizer):
    assert G.pre_tokenizer_name(smol_tokenizer) == "gpt-2"  # byte-level with GPT-2's split
    from tokenizers import Tokenizer, models, pre_tokenizers

    spm = Tokenizer(models.BPE(vocab={"▁a": 0, "<unk>": 1}, merges=[], unk_token="<unk>", byte_fallback=True))
    spm.pre_tokenizer = pre_tokenizers.Metaspace()
    with pytest.raises(LorakitError, match="byte-level BPE"):
        G.pre_tokenizer_name(PreTrainedTokenizerFast(tokenizer_object=spm))


def test_architectures_lorakit_writes_and_ones_it_refuses():
    assert G._arch(LlamaConfig()) == ("llama", True)
    assert G._arch(Qwen2Config()) == ("qwen2", False)  # NEOX-style rotary: no Q/K permutation
    with pytest.raises(LorakitError, match="'gpt2'"):
        G._arch(GPT2Config())
    with pytest.raises(LorakitError, match="'llama3'"):
        G._arch(LlamaConfig(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 8192}))


def test_vocab_table_marks_special_tokens_control_and_pads_the_embedding_rows(smol_tokenizer):
    from gguf import TokenType

    n = len(smol_tokenizer)
    tokens, types = G.vocab_table(smol_tokenizer, n + 2)
    assert tokens[2] == "<|im_end|>" and types[2] == TokenType.CONTROL
    assert tokens[n:] == [f"[PAD{n}]", f"[PAD{n + 1}]"] and types[n:] == [TokenType.UNUSED] * 2
    assert types.count(TokenType.NORMAL) == n - len(smol_tokenizer.added_tokens_decoder)


def test_ollama_template_matches_chatml_and_keeps_the_default_system_prompt(smol_tokenizer):
    family, default = match_family(smol_tokenizer)
    assert family.name == "chatml" and default.startswith("You are a helpful AI assistant named SmolLM")
    text = modelfile_text(smol_tokenizer, "m.gguf", [2])
    assert 'PARAMETER stop "<|im_end|>"' in text and "FROM ./m.gguf" in text
    assert text.count("{{ end }}") == 3  # if .System, if ne .Role, range


def test_ollama_template_for_llama3_and_none_for_an_unknown_family(smol_tokenizer):
    from tokenizers.processors import TemplateProcessing

    # Llama 3's tokenizer adds BOS itself, so the template's bos_token is llama.cpp's job, not Ollama's.
    backend = copy.deepcopy(smol_tokenizer.backend_tokenizer)
    backend.post_processor = TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    llama3 = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>")
    llama3.chat_template = LLAMA3_TEMPLATE
    family, default = match_family(llama3)
    assert family.name == "llama3" and default is None
    llama3.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert match_family(llama3) is None
    assert "TEMPLATE" not in modelfile_text(llama3, "m.gguf", [2])


def test_requests_are_parsed_with_bounds():
    req = parse_request(json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                    "max_tokens": 5, "stream": True, "temperature": 0}).encode())
    assert req.messages == [{"role": "user", "content": "hi"}] and req.max_tokens == 5 and req.stream
    bad = [b"[1]", b'{"messages": []}', b'{"messages": [{"role": "user", "content": 3}]}',
           b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": %d}' % (MAX_TOKENS + 1),
           b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": true}',
           b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}',
           b'{"messages": [{"role": "assistant", "content": "hi"}]}', b"\xff"]
    for body in bad:
        with pytest.raises(BadRequest):
            parse_request(body)


def test_chat_commands_set_the_system_prompt_and_clear_history():
    session = _Session()
    session.history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    session.command("/system Be terse.")
    assert session.history == [] and session.messages("q")[0] == {"role": "system", "content": "Be terse."}
    session.history = [{"role": "user", "content": "a"}]
    session.command("/reset")
    assert session.history == [] and session.system == "Be terse."
