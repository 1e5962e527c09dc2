"""Architecture coverage: every decoder-only causal LM in the installed
transformers, unmodified, compiled with the gear backend.

For each `model_type` of transformers' causal-LM auto mapping a tiny random
config is built offline through the config's constructor, so derived fields
follow (`tiny_config`: 2 layers, 4 query / 2 KV heads, head dim 32, a small
vocabulary, windows of 128 tokens where the family has one; MLA ranks 32 / 16
/ 16; a hybrid's own layer pattern cut to 4 layers with an attention layer;
per-layer configs moved onto the tiny layers; `FAMILY` where a family needs
its own rule, with why) and, in a fresh process, fed a 200-token random prompt:

  exact     `method="none"` generates the eager model's greedy tokens (12)
  sites     attention sites found, rewritten, and left exact (with reasons),
            over every graph compiled (prefill and decode)
  gear4     GEAR 4-bit over a prompt and `--steps` decode steps: the layers
            whose cache ends compressed, KV bytes vs the same cache dense in
            the model's dtype, the logits error vs eager while the tokens agree,
            and the graphs compiled
  agree     the report and the run agree: every layer reported rewritten ends
            with a compressed cache (unless Dynamo gave up compiling its frame,
            which then runs eagerly: `status`)

A row is `full` (all of the above, every site rewritten), `partial` (correct;
some sites left exact, each reported), `WRONG` (tokens differ from eager with
method none, or the report and the run disagree), `error` (a crash, with its
message), `n/a` (no attention KV cache, e.g. a recurrent model), or
`pending` (`--build-only`: it builds and generates eagerly, not swept yet;
counted in the headline's denominator). Entries not built are listed with the
reason: an encoder, an encoder-decoder, a multimodal wrapper whose text model
has its own entry, a drafter that holds no cache, or the error.

    python benchmarks/arch_coverage.py                 # every architecture (hours on 2 busy cores)
    python benchmarks/arch_coverage.py --only llama gemma2
    python benchmarks/arch_coverage.py --ci            # the families CI runs
    python benchmarks/arch_coverage.py --build-only    # every entry built and run eagerly (~10 min)
    python benchmarks/arch_coverage.py --merge a.json b.json   # one table; a later file's row wins

Writes `benchmarks/results/arch_coverage.{md,json}` and prints the headline:
% fully rewritten, % correct. `tests/test_arch_coverage.py` runs `sweep_one`
on the CI set.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from gear_compile.hf_compat import cache_of
from machine import cpu_name

HERE = Path(__file__).resolve().parent

# What CI runs: the families most used, one of each attention form the
# matcher knows (SDPA with GQA, eager, MQA, fused QKV, partial rotary,
# sliding window, soft-capping, heads flattened into bmm), and one it reports
# (ALiBi through baddbmm).
CI_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2",
            "gpt_neox", "gpt_bigcode", "falcon", "starcoder2", "xglm", "bloom"]

# tiny sizes, set on each config whose defaults have the attribute
SIZES = {
    "hidden_size": 128, "n_embd": 128, "d_model": 128, "n_embed": 128,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "n_heads": 4,
    "num_key_value_heads": 2, "num_kv_heads": 2, "multi_query_group_num": 2,
    "head_dim": 32, "swa_head_dim": 32, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2,
    "intermediate_size": 256, "n_inner": 256, "ffn_dim": 256, "ffn_hidden_size": 256,
    "intermediate_size_mlp": 256, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "n_group": 1, "topk_group": 1, "num_expert_group": 1, "num_experts_per_token": 2,
    "n_shared_experts": 1, "moe_k": 2, "index_num_heads": 2, "kv_n_heads": 2, "moe_num_experts": 4, "moe_top_k": 2, "unpadded_vocab_size": 512,
    "vocab_size": 512, "max_position_embeddings": 512, "n_positions": 512, "max_seq_len": 512,
    "vocab_size_per_layer_input": 512, "hidden_size_per_layer_input": 16,
    "hidden_size_global": 128, "encoder_hash_byte_group_vocab": 512,
    "sliding_window": 128, "sliding_window_size": 128, "rotary_dim": 16,
    # linear-attention / state-space layers of the hybrids
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 32,
    "linear_value_head_dim": 32, "linear_head_dim": 32, "mamba_n_heads": 8, "mamba_d_head": 32,
    "mamba_d_ssm": 256, "mamba_head_dim": 32, "n_mamba_heads": 2, "mamba_d_state": 16, "state_size": 16,
}
# MLA (DeepSeek V2 / V3 and their kin): the cache holds a latent of kv_lora_rank and one rotary key
# part of qk_rope_head_dim; the head dims derive from these, so head_dim is not set
MLA = {"kv_lora_rank": 32, "q_lora_rank": 16, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 32}
LAYERS, HYBRID_LAYERS = 2, 4
# per-layer lists (one entry a layer) and index lists (the layers of one kind) that follow the layer count
PER_LAYER = ("layer_types", "layers_block_type", "mlp_layer_types", "block_types", "attention_layers",
             "activation_sparsity_pattern")
LAYER_INDICES = ("full_attn_idxs", "hybrid_layer_ids", "attn_layer_indices")
# what a layer type that holds an attention KV cache is called (the rest: recurrent, linear, MLP)
ATTENTION_KINDS = re.compile(r"attention|attn|global|local|hybrid|sliding")
NOT_ATTENTION_KINDS = re.compile(r"linear_attention|mamba|recurrent|mlp|moe|dense|sparse")
# a MoE's sizes, set where the defaults leave them None but the model has experts
MOE = ("num_experts_per_tok", "n_routed_experts", "num_experts", "num_local_experts", "n_shared_experts")
_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
_LINEAR, _FULL = "linear_attention", "full_attention"
# a family's own rule where the generic one does not reach, and why
FAMILY = {
    # attention every 8 layers from layer 4 by default: none in the tiny model
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1),
    # its shared attention block is tied across the hybrid layers: two of them
    "zamba": dict(num_hidden_layers=4, layers_block_type=[_LINEAR, "hybrid"] * 2),
    # every layer a Mamba layer by default: attention layers are given by index
    "bamba": dict(num_hidden_layers=4, attn_layer_indices=[3]),
    "granitemoehybrid": dict(num_hidden_layers=4, layer_types=[_LINEAR] * 3 + [_FULL]),
    # the pattern of three blocks repeats over the layers
    "recurrent_gemma": dict(num_hidden_layers=3),
    # its layer list is built from (pattern, repeats)
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
    # hidden_size * expand must equal num_heads * head_dim
    "mamba2": dict(num_heads=8),
    # the layers split into input, recurrent (looped) and output blocks, each an attention + an MLP
    "dory": dict(num_hidden_layers=4, layer_types=None, n_input_layers=1, n_recurrent_layers=2,
                 n_output_layers=1),
    # the last layers reuse the caches of earlier ones of their kind (KV sharing)
    "gemma3n_text": dict(num_hidden_layers=4, layer_types=["sliding_attention", _FULL] * 2,
                         activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0], num_kv_shared_layers=2),
    # the defaults leave these unset, and the model reads them: layer_types (None), the
    # indexer's sizes (None), the rope parameters of its layer type ({}), attn_config's rope_theta
    "lfm2_moe": dict(num_hidden_layers=4, num_dense_layers=1, layer_types=["conv", _FULL] * 2),
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=32,
                           indexer_budget=64, indexer_compress_ratio=4),
    "cohere_compass_text": dict(rope_parameters={_FULL: _ROPE}),
    "dbrx": dict(attn_config=dict(rope_theta=10000.0, clip_qkv=8.0)),
    # a sliding layer's head_dim must equal its qk_nope_head_dim (scaled to 24) + qk_rope_head_dim
    "dots3_note_text": dict(head_dim=40),
    # only one expert a token is supported
    "zaya": dict(num_experts_per_tok=1),
}
FAMILY["qwen4_exp"] = dict(text_config=FAMILY["qwen4_exp_text"])
FAMILY["dots3_note"] = dict(text_config=FAMILY["dots3_note_text"])
PROMPT, NEW_TOKENS = 200, 12
MAX_PARAMETERS = 50_000_000      # a "tiny" model past this would take the machine's memory


def tiny_config(model_type: str):
    """A tiny random config of `model_type`, built through its constructor
    (so derived fields follow), or raise ValueError(why not)."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    if MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type].endswith("ForConditionalGeneration"):
        raise ValueError("a multimodal wrapper (its text model is swept under its own entry)")
    if MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type].endswith("AssistantForCausalLM"):
        raise ValueError("a speculative-decoding drafter: every layer reads the target model's KV cache "
                         "(num_kv_shared_layers = num_hidden_layers), it holds none of its own")
    cls = CONFIG_MAPPING[model_type]
    default = cls()
    if getattr(default, "is_encoder_decoder", False):
        raise ValueError("encoder-decoder")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise ValueError("an encoder family (masked LM; a decoder only as is_decoder=True)")
    config = cls(**_merged(_tiny_kwargs(cls, default), FAMILY.get(model_type, {})))
    for key, value in _in_vocabulary(config.to_dict()).items():
        if key.endswith("token_id"):
            setattr(config, key, value)
    return config


def _tiny_kwargs(cls, default) -> dict:
    """SIZES (and MLA's) for the attributes `default` has (read from its
    dict: a per-layer attribute is not read as a global), the layer count and
    every per-layer list that follows it (`_tiny_layers`), and the same for
    each nested sub-config (a composite model's text_config, ...: left at its
    defaults it would build a full-size model)."""
    fields = default.to_dict()
    # every size the config has, unset ones too (head_dim None: derived unless given); a window only
    # where the family has one
    kwargs = {k: v for k, v in SIZES.items() if k in fields and
              (fields[k] is not None or not k.startswith("sliding_window"))}
    if any(fields.get(k) is not None for k in MOE + ("moe_intermediate_size",)):
        kwargs.update({k: SIZES[k] for k in MOE if k in fields})
    if fields.get("kv_lora_rank"):
        # the rotary embedding's head_dim is the rope part where the family says so
        rope_head = fields.get("head_dim") == fields.get("qk_rope_head_dim")
        kwargs.pop("head_dim", None)
        kwargs.update({k: v for k, v in MLA.items() if fields.get(k) is not None})
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", 4)
        if rope_head:
            kwargs["head_dim"] = MLA["qk_rope_head_dim"]
    kwargs.update(_tiny_layers(fields))
    if fields.get("per_layer_config"):
        kwargs["per_layer_config"] = _tiny_per_layer(fields, kwargs)
    for name in getattr(cls, "sub_configs", {}):
        sub = getattr(default, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            kwargs[name] = _in_vocabulary(dict(sub.to_dict(), **_tiny_kwargs(type(sub), sub)))
    return kwargs


def _tiny_layers(fields: dict) -> dict:
    """The layer count, with the per-layer lists cut to it. A model without
    per-layer lists gets LAYERS; a hybrid gets HYBRID_LAYERS taken from its
    own pattern: its first three layers and then the first layer of a kind
    not among them (an attention layer, where the first three have none),
    so the tiny model keeps at least one layer of each of the first kinds
    and one attention layer."""
    count = next((k for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers") if k in fields), None)
    if count is None:
        return {}
    total = fields[count]
    lists = {k: fields[k] for k in PER_LAYER if isinstance(fields.get(k), list) and len(fields[k]) == total}
    pattern = next(iter(lists.values()), [])
    if len(set(map(str, pattern))) <= 1 and not any(isinstance(fields.get(k), list) for k in LAYER_INDICES):
        return {count: LAYERS, **{k: v[:LAYERS] for k, v in lists.items()}}
    picked = list(range(min(3, total)))
    kinds = [pattern[i] for i in picked] if pattern else []
    rest = [j for j in range(len(picked), total) if not pattern or pattern[j] not in kinds]
    attention = [j for j in rest if pattern and _attention_kind(pattern[j])]
    picked.append((attention or rest or [min(len(picked), total - 1)])[0])
    out = {count: len(picked)}
    out.update({k: [v[i] for i in picked] for k, v in lists.items()})
    for key in LAYER_INDICES:
        if isinstance(fields.get(key), list):
            kept = [picked.index(i) for i in fields[key] if i in picked]
            out[key] = kept or [len(picked) - 1]
    return out


def _tiny_per_layer(fields: dict, kwargs: dict) -> dict:
    """A per-layer config (layer index -> the attributes that layer sets
    apart, e.g. Gemma 4's wider global head_dim) moved onto the tiny layers:
    each kind's attributes (its first entry's) onto every tiny layer of that
    kind, their sizes scaled as the global ones were (a head dim in
    proportion, so a layer keeps a head dim unlike the others)."""
    kinds, tiny = fields.get("layer_types") or [], kwargs.get("layer_types") or []
    scale = {**SIZES, **MLA}
    out = {}
    for key, attributes in fields["per_layer_config"].items():
        kind = kinds[int(key)] if int(key) < len(kinds) else None
        for j in (j for j, k in enumerate(tiny) if k == kind):
            out.setdefault(str(j).zfill(len(key)) if isinstance(key, str) else j, {
                k: _scaled(k, v, fields, kwargs.get(k, scale.get(k, v))) for k, v in attributes.items()})
    return out


def _scaled(name: str, value, fields: dict, tiny):
    """A per-layer size: a head dim in proportion to the global one, others the tiny size."""
    if not isinstance(value, int) or isinstance(value, bool):
        return value
    if name.endswith("head_dim") and fields.get(name) and isinstance(tiny, int):
        return max(1, value * tiny // fields[name])
    return tiny


def _merged(options: dict, family: dict) -> dict:
    """`family` over `options`, nested dicts (a sub-config's) merged key by key."""
    out = dict(options)
    for k, v in family.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _attention_kind(kind) -> bool:
    return isinstance(kind, str) and bool(ATTENTION_KINDS.search(kind)) and not NOT_ATTENTION_KINDS.search(kind)


def _in_vocabulary(options: dict) -> dict:
    """Special token ids moved inside the tiny vocabulary."""
    return {k: 1 if k.endswith("token_id") and isinstance(v, int) and v >= 256 else v
            for k, v in options.items()}


def _parameters(config) -> int:
    """Parameters the model of `config` would have (built on the meta device)."""
    import transformers as tf
    with torch.device("meta"):
        return sum(p.numel() for p in tf.AutoModelForCausalLM.from_config(config).parameters())


def _generate(model, prompt, new_tokens):
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, prompt.shape[1]:].tolist(), [x[0].float() for x in out.logits], cache_of(out)


def _logits_error(tokens, logits, ref_tokens, ref_logits) -> float:
    """Largest relative L2 error of a step's logits vs the reference's, over
    the decode steps whose inputs are still the same tokens (up to and
    including the first step that picks a different one)."""
    same = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(tokens) - 1)
    return max(float((logits[i] - ref_logits[i]).norm() / ref_logits[i].norm())
               for i in range(1, same + 1)) if same else 0.0


def crash(e: BaseException) -> str:
    """A crash in one line: the exception's first line and, where it wraps
    another (Dynamo's BackendCompilerFailed says only "backend='gear'
    raised:" on its first), the first line of the innermost one: the cause."""
    text, inner = f"{type(e).__name__}: {e}".strip().splitlines()[0], e
    while (wrapped := getattr(inner, "inner_exception", None) or inner.__cause__) is not None:
        inner = wrapped
    if inner is not e:
        text += f" {type(inner).__name__}: {(str(inner).strip().splitlines() or [''])[0]}"
    return text


@contextlib.contextmanager
def recompile_limits():
    """The functions that hit Dynamo's recompile limit meanwhile, as reasons
    (a list filled as they hit it). Such a frame runs eagerly from then on, reading
    its compressed cache back dense, so its layers end uncompressed: e.g. a
    MoE whose routing sizes go through `.tolist()`, a guard that changes at
    every step."""
    hits, dynamo = [], logging.getLogger("torch._dynamo")

    class Hits(logging.Handler):
        def emit(self, record):
            if str(record.msg).startswith("torch._dynamo hit config.") and len(record.args) >= 4:
                limit, value, function, reason = record.args[:4]
                hits.append(f"Dynamo's {limit} ({value}) hit in {str(function).split(' (')[0]}: it runs "
                            f"eagerly from then on, its cache read back dense (last recompile: "
                            f"{str(reason).split('#')[0].strip()})")
    handler = Hits()
    dynamo.addHandler(handler)
    try:
        yield hits
    finally:
        dynamo.removeHandler(handler)


def _attention_layers(cache) -> tuple[int, int]:
    """(layers holding K/V, of which compressed) of a generate() cache."""
    from gear_compile import CompressedKV
    layers = [layer for layer in getattr(cache, "layers", [])
              if isinstance(getattr(layer, "keys", None), torch.Tensor)]
    return len(layers), sum(isinstance(layer.keys, CompressedKV) for layer in layers)


def sweep_one(model_type: str, steps: int = 50, build_only: bool = False) -> dict:
    """Everything the table records for one architecture (see the module doc);
    with `build_only`, whether its tiny config builds and generates eagerly
    (status `pending`: a decoder with an attention cache, counted but not
    yet swept through the backend)."""
    import transformers as tf

    import gear_compile
    from gear_compile.compressed_kv import STATE_KINDS
    from gear_compile.report import collect
    row = dict(arch=model_type)
    try:
        config = tiny_config(model_type)
        params = _parameters(config)
    except Exception as e:       # noqa: BLE001 - any reason a config cannot be built is reported
        return dict(row, status="not built", reason=f"{type(e).__name__}: {e}"[:200])
    if params > MAX_PARAMETERS:
        return dict(row, status="not built", reason=f"the tiny config still builds {params / 1e6:.0f} M "
                                                      f"parameters (sizes SIZES does not reach)")
    try:
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config).eval()
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        row["class"] = type(model).__name__
        prompt = torch.randint(3, 256, (1, PROMPT), generator=torch.Generator().manual_seed(0))
        original = model.forward
        with torch.no_grad():
            eager_tokens, eager_logits, cache = _generate(model, prompt, 2 if build_only else max(steps, NEW_TOKENS))
            row["attention_layers"], _ = _attention_layers(cache)
    except Exception as e:       # noqa: BLE001 - the tiny config itself does not run
        return dict(row, status="not built",
                    reason=f"the tiny config does not run eagerly: {crash(e)}"[:300])
    if build_only:
        return dict(row, status="pending" if row["attention_layers"] else "n/a",
                    reason="builds and generates eagerly; not swept through the gear backend in this run"
                    if row["attention_layers"] else "no attention KV cache")
    try:
        with torch.no_grad():
            gear_compile.compile(model, method="none")
            tokens, _, _ = _generate(model, prompt, NEW_TOKENS)
            row["exact"] = tokens == eager_tokens[:NEW_TOKENS]
            model.forward = original
            torch._dynamo.reset()

            gear_compile.compile(model, method="gear", bits=4)
            with collect() as reports, recompile_limits() as limits:
                tokens, logits, cache = _generate(model, prompt, steps)
            model.forward = original
            torch._dynamo.reset()
    except Exception as e:       # noqa: BLE001 - a crash is a row of the table, not the end of the sweep
        return dict(row, status="error", reason=crash(e)[:300])
    sites = [s for g in reports for s in g.sites]
    row.update(
        sites=len(sites), rewritten=sum(s.rewritten for s in sites),
        fallbacks=sorted({f"{s.form}: {s.reason}" for s in sites if not s.rewritten} | set(limits)),
        graphs=len(reports),
        logits_error=_logits_error(tokens, logits, eager_tokens, eager_logits))
    layers, compressed = _attention_layers(cache)
    row["compressed_layers"] = compressed
    # a generate() that returns no cache (mpt) or one without attention layers (xLSTM's)
    attention_cache = cache is not None and hasattr(cache, "layers")
    # the attention layers' K/V only: a hybrid's recurrent states (and a sparse attention's indexer
    # keys) are held exact and counted apart (`STATE_KINDS`)
    split = gear_compile.kv_breakdown(cache) if attention_cache else None
    row["state_bytes"] = 0 if split is None else sum(split.kinds.get(k, 0) for k in set(STATE_KINDS.values()))
    row["kv_ratio"] = 0.0 if split is None else \
        (split.held - row["state_bytes"]) / max(1, gear_compile.dense_bytes(cache, model.dtype))
    row["forms"] = sorted({s.form for s in sites if s.rewritten})
    decode = [s for g in reports for s in g.sites if s.phase == "decode"]
    # layers the report says are compressed: by the cache layer each rewritten decode site reads,
    # where every one is known (a module path is relative to a frame resumed after a graph break:
    # Dbrx's two layers are both "norm_attn_norm.attn"); else by module path, or (a model that
    # runs one attention module for several cache layers, e.g. HRM's recurrence) by rewritten
    # decode sites in one graph
    per_graph = [sum(s.rewritten for s in g.sites if s.phase == "decode") for g in reports]
    slots = {getattr(s, "cache_layer", None) for s in decode if s.rewritten}
    reported = len(slots) if slots and None not in slots else \
        max([len({s.layer for s in decode if s.rewritten})] + per_graph)
    row["agree"] = compressed == reported or (not decode and compressed == 0)
    row["status"] = status(row, layers, gave_up=bool(limits) and compressed < reported)
    if row["status"] == "n/a":        # attention without a cache (e.g. openai-gpt) has nothing to compress
        row["reason"] = "no attention KV cache"
    return row


def status(row: dict, layers: int, gave_up: bool = False) -> str:
    """A swept row's status (see the module doc) from its `exact`, `agree`,
    sites and layers; `layers` holding K/V in the GEAR run's cache. Where
    Dynamo gave up compiling a frame (its recompile limit: `gave_up`), that
    frame ran eagerly from then on and read its cache back dense, so fewer
    layers end compressed than the compiled graphs rewrote: the row names
    the frame (`recompile_limits`) and is partial, not WRONG, while its
    tokens equal eager's."""
    if not row["attention_layers"] and row["compressed_layers"] == 0:
        return "n/a"
    if not row["exact"] or not (row["agree"] or gave_up):
        return "WRONG"
    if row["sites"] and row["rewritten"] == row["sites"] and row["compressed_layers"] == layers:
        return "full"
    return "partial"


def architectures() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def spawn(model_type: str, steps: int, timeout: float) -> dict:
    """`sweep_one` in a fresh process (fresh Dynamo state; a hang or a crash
    of the interpreter is a row, not the end of the sweep)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", model_type, "--steps", str(steps)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(arch=model_type, status="error", reason=f"timed out after {timeout:g} s")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        died = f"the worker died with exit code {done.returncode}" + (
            " (killed: out of memory?)" if done.returncode in (-9, 137) else "")
        tail = (done.stderr.strip().splitlines() or [died])[-1]
        return dict(arch=model_type, status="error", reason=tail[:300])
    return json.loads(lines[-1])


def headline(rows: list[dict]) -> str:
    """Fully rewritten over every buildable decoder with an attention cache
    (those not swept yet, `pending`, count as not fully rewritten)."""
    swept = [r for r in rows if r["status"] in ("full", "partial", "WRONG", "error")]
    pending = sum(r["status"] == "pending" for r in rows)
    n, total = max(1, len(swept)), max(1, len(swept) + pending)
    full = sum(r["status"] == "full" for r in swept)
    wrong = sum(r["status"] == "WRONG" for r in swept)
    errors = sum(r["status"] == "error" for r in swept)
    return (f"{len(swept) + pending} buildable architectures with an attention KV cache, {len(swept)} swept"
            f"{f' ({pending} built but not swept yet)' if pending else ''}: {full} fully rewritten "
            f"({100 * full / total:.1f} %, target >= 90 %), {100 * (n - wrong - errors) / n:.1f} % of those "
            f"swept correct (target 100 %: {wrong} wrong, {errors} errors)")


def provenance(argv: list[str]) -> str:
    """Where a row comes from: the command, the installed transformers, the
    commit (with "+" where the working tree differs from it)."""
    import transformers

    def git(*a):
        return subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True).stdout.strip()
    dirty = "+" if git("status", "--porcelain", "--", "../gear_compile", str(Path(__file__).name)) else ""
    return (f"`python benchmarks/arch_coverage.py {' '.join(argv)}`, transformers {transformers.__version__}, "
            f"commit {git('rev-parse', '--short', 'HEAD')}{dirty}")


def write(rows: list[dict], args, path: Path) -> None:
    """The table (a row's `run` numbers its provenance, listed below it) and the rows as JSON."""
    runs = list(dict.fromkeys(r.get("provenance", "not recorded") for r in rows))
    steps = ("each run's `--steps` decode steps (its command under Runs)" if args.merge
             else f"{args.steps} decode steps")
    lines = [
        "# Architecture coverage: unmodified decoders through the gear backend", "",
        f"- machine: {cpu_name()}; torch {torch.__version__}",
        f"- tiny random configs built through each config's constructor (`tiny_config`: `SIZES`, `MLA`, "
        f"hybrid patterns, `FAMILY`), prompt {PROMPT} tokens, exact check over {NEW_TOKENS} "
        f"greedy tokens, GEAR 4-bit over {steps}; "
        "kv %: bytes held vs the same cache dense in the model's dtype (attention layers' K/V; a hybrid's "
        "recurrent states are exact and not counted); "
        "logits err: largest relative L2 error of a decode step's logits vs eager while the tokens agree; "
        "forms: the rewritten sites' forms (sdpa, eager, bmm; rebuild: a cache read back densely in front "
        "of the model's own reader; mla: a decode step's attention absorbed over the MLA latent; blank: a "
        "row swept before forms were recorded)",
        f"- **{headline(rows)}**", "",
        "| arch | status | sites rewritten / found | forms | none == eager | compressed layers | kv % | "
        "logits err | graphs | run | fallbacks / reason |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        run = runs.index(r.get("provenance", "not recorded")) + 1
        if r["status"] == "not built":
            continue
        if "sites" not in r:
            lines.append(f"| {r['arch']} | {r['status']} | | | | | | | | {run} | {r.get('reason', '')} |")
            continue
        notes = "; ".join(r["fallbacks"]) or ("report and run disagree" if not r["agree"] else "")
        lines.append(
            f"| {r['arch']} | {r['status']} | {r['rewritten']} / {r['sites']} | {' '.join(r.get('forms') or [])} | "
            f"{'yes' if r['exact'] else 'NO'} | {r['compressed_layers']} / {r['attention_layers']} | "
            f"{100 * r['kv_ratio']:.0f} | {r['logits_error']:.3f} | {r['graphs']} | {run} | "
            f"{notes.replace('|', '/')} |")
    skipped = [r for r in rows if r["status"] == "not built"]
    if skipped:
        lines += ["", "## Not built", ""] + [
            f"- {r['arch']}: {r['reason']} (run {runs.index(r.get('provenance', 'not recorded')) + 1})"
            for r in skipped]
    lines += ["", "## Runs", ""] + [f"{i}. {run}" for i, run in enumerate(runs, 1)]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps(rows, indent=1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", help="these model types (default: all)")
    p.add_argument("--ci", action="store_true", help=f"the CI set: {' '.join(CI_ARCHS)}")
    p.add_argument("--steps", type=int, default=50, help="GEAR-4 decode steps per architecture")
    p.add_argument("--timeout", type=float, default=600, help="seconds per architecture")
    p.add_argument("--out", type=Path, default=HERE / "results" / "arch_coverage")
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                   help="write one table from the rows of several runs (e.g. halves run with --only on "
                        "separate cores), in architecture order")
    p.add_argument("--build-only", action="store_true",
                   help="only build each tiny config and generate eagerly (rows `pending`, `n/a` or `not built`)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(sweep_one(args.worker, args.steps)))
        return
    if args.merge:
        # the last run of an architecture wins; each row keeps its own provenance
        rows = {r["arch"]: r for f in args.merge for r in json.loads(f.read_text())}
        rows = sorted(rows.values(), key=lambda r: r["arch"])
        write(rows, args, args.out)
        print(headline(rows))
        return
    known = architectures()
    chosen = CI_ARCHS if args.ci else args.only or known
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        p.error(f"unknown model type(s) {unknown}; valid: {' '.join(known)}")
    rows, origin = [], provenance(sys.argv[1:] if argv is None else argv)
    for i, arch in enumerate(chosen):
        t0 = time.perf_counter()
        print(f"[{i + 1}/{len(chosen)}] {arch} ...", end=" ", flush=True)
        # building compiles nothing: in this process (a fresh one per entry is most of the time)
        row = sweep_one(arch, build_only=True) if args.build_only else spawn(arch, args.steps, args.timeout)
        row["provenance"] = origin
        rows.append(row)
        print(f"{row['status']} ({time.perf_counter() - t0:.0f} s) {row.get('reason', '')}", flush=True)
        write(rows, args, args.out)
    print(headline(rows))


if __name__ == "__main__":
    main()
