"""Hugging Face checkpoints in, safetensors and JSON only (Llama 2/3/3.1, SmolLM, EuroBERT, ours,
Mistral without sliding window), onto model.py's names; out: export.py. docs/huggingface.md."""

import os
import re

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from mlm_vs_clm import files
from model import LLAMA3_ROPE_KEYS, ModelConfig, Transformer

# mistral without sliding window is a Llama; sl_model: the paper's checkpoints (docs/huggingface.md)
SUPPORTED_MODEL_TYPES = ("llama", "eurobert", "mistral", "sl_model")
TOP_NAMES = {"embed_tokens.weight": "embed.weight", "norm.weight": "norm.weight",
             "lm_head.weight": "lm_head.weight"}
LAYER_NAMES = {"input_layernorm.weight": "attn_norm.weight",
               "post_attention_layernorm.weight": "mlp_norm.weight",
               **{f"self_attn.{p}_proj.weight": f"attn.{p}_proj.weight" for p in "qkvo"},
               **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}}
# HF Llama's q/k are in model.py's half-split RoPE layout (not Meta's interleaved): no permutation

def our_name(hf_name: str) -> str | None:
    # *ForCausalLM / *ForMaskedLM prefix the body; a bare *Model does not
    name = hf_name.removeprefix("model.")
    if m := re.fullmatch(r"layers\.(\d+)\.(.+)", name):
        return f"blocks.{m[1]}.{LAYER_NAMES[m[2]]}" if m[2] in LAYER_NAMES else None
    return TOP_NAMES.get(name)

def hf_name(name: str) -> str:
    if m := re.fullmatch(r"blocks\.(\d+)\.(.+)", name):
        return f"model.layers.{m[1]}." + {v: k for k, v in LAYER_NAMES.items()}[m[2]]
    return name if name == "lm_head.weight" \
        else "model." + {v: k for k, v in TOP_NAMES.items()}[name]

def model_config_from_hf(hf: dict, config_path: str, vocab_size: int) -> ModelConfig:
    """config.json -> ModelConfig, or a ValueError naming everything model.py cannot represent."""
    problems = []
    if hf.get("model_type") not in SUPPORTED_MODEL_TYPES:
        problems.append(f"model_type {hf.get('model_type')!r} "
                        f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    problems += [f"{key}=true (model.py's linear layers have no biases)"
                 for key in ("attention_bias", "mlp_bias") if hf.get(key)]
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf.get('hidden_act')!r} (model.py's MLP is SwiGLU: silu)")
    if hf.get("sliding_window") is not None and hf.get("use_sliding_window", True):
        problems.append(f"sliding_window={hf['sliding_window']} (model.py has no window)")
    # transformers >= 5 writes rope_parameters (theta inside); older ones rope_theta, rope_scaling
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        problems.append(f"rope type {rope_type!r} (model.py: plain RoPE or Llama 3.1's 'llama3')")
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        problems.append("partial_rotary_factor != 1 (model.py rotates the whole head)")
    try:
        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
        if (hf.get("head_dim") or hidden // heads) * heads != hidden:
            problems.append(f"head_dim {hf.get('head_dim')} != hidden_size / num_attention_heads = "
                            f"{hidden / heads:g}")
        if problems:
            raise ValueError(f"{config_path}: model.py cannot represent: {'; '.join(problems)}")
        scaling = {k: rope[k] for k in LLAMA3_ROPE_KEYS} if rope_type == "llama3" else None
        return ModelConfig(vocab_size=vocab_size, n_layer=hf["num_hidden_layers"], n_embd=hidden,
                           n_head=heads, n_kv_head=hf.get("num_key_value_heads") or heads,
                           mlp_hidden=hf["intermediate_size"],
                           block_size=hf.get("max_position_embeddings", 2048),
                           rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                           norm_eps=hf.get("rms_norm_eps", 1e-6),
                           tie_embeddings=hf.get("tie_word_embeddings", False),
                           init_std=hf.get("initializer_range", 0.02), rope_scaling=scaling)
    except KeyError as e:
        raise ValueError(f"{config_path}: no {e.args[0]!r}: not a Llama-style config") from None

def weight_files(path: str) -> list[str]:
    """model.safetensors, or every shard model.safetensors.index.json lists."""
    single, index = (os.path.join(path, f"model.safetensors{end}") for end in ("", ".index.json"))
    if os.path.exists(single):
        return [single]
    if not os.path.exists(index):
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                "(pytorch_model.bin is not read: re-save it with safetensors)")
    listing = files.read_json(index, "a safetensors index")
    weight_map = listing.get("weight_map") if isinstance(listing, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: no weight_map: not a safetensors index")
    shards = [os.path.join(path, name) for name in sorted(set(map(str, weight_map.values())))]
    if missing := [f for f in shards if not os.path.exists(f)]:
        raise FileNotFoundError(f"{index} lists shards that are not there: {missing}: "
                                "download all of them")
    return shards

def headers(shards: list[str]) -> dict:
    """name -> (shape, dtype) of every tensor, read from the files' headers: nothing is loaded."""
    found = {}
    for file in shards:
        try:
            with safe_open(file, "pt") as f:
                found |= {name: (tuple(f.get_slice(name).get_shape()),
                                 f.get_slice(name).get_dtype()) for name in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: unreadable safetensors file ({e}): "
                             "truncated or corrupt download?") from None
    return found

def check_fit(cfg: ModelConfig, shapes: dict, where: str) -> None:
    """Raises unless weights of these shapes (our names) are a model of cfg, allocating nothing."""
    blocks = len({int(n.split(".")[1]) for n in shapes if n.startswith("blocks.")})
    if cfg.n_layer != blocks:
        raise ValueError(f"{where}: its config has {cfg.n_layer} blocks and its weights {blocks}")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    if missing := sorted(set(expected) - set(shapes)):
        raise ValueError(f"{where}: missing weights for {missing[:6]}")
    for name, shape in shapes.items():
        if name in expected and shape != expected[name]:
            raise ValueError(f"{where}: {name} has shape {shape}, config implies {expected[name]}")

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
POSITIVE_INTS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                 "vocab_size", "num_key_value_heads", "max_position_embeddings", "head_dim")

def load_hf(path: str, tok, head: bool = True) -> Transformer:
    """path's model for tok (which may add ids), checked on file headers first; head=False: body"""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: hf:PATH must be a Hugging Face "
                                "checkpoint directory (config.json, model.safetensors or shards)")
    hf = files.read_json(config_path, "a Hugging Face config.json")
    if not isinstance(hf, dict):
        raise ValueError(f"{config_path}: a JSON {type(hf).__name__}, not a config object")
    for key in POSITIVE_INTS:  # absent: optional, or a KeyError below; type(): a bool is no count
        if (value := hf.get(key)) is not None and (type(value) is not int or value < 1):
            raise ValueError(f"{config_path}: {key} must be a positive integer, got {value!r}")
    cfg = model_config_from_hf(hf, config_path, tok.n_vocab)
    n_rows = hf["vocab_size"]
    if n_rows != tok.base_vocab:
        raise ValueError(f"{config_path}: vocab_size {n_rows}, but tokenizer {tok.name} has "
                         f"{tok.base_vocab} ids: use the tokenizer of the same checkpoint")
    shards, shapes = weight_files(path), {}
    for name, (shape, dtype) in headers(shards).items():
        if (ours := our_name(name)) is not None and dtype not in FLOAT_DTYPES:
            raise ValueError(f"{path}: {name} holds {dtype} values, not floating point: "
                             "a quantized checkpoint? Give the full-precision one")
        if ours is not None:
            shapes[ours] = shape
        elif not name.endswith("rotary_emb.inv_freq"):  # old files saved RoPE's
            raise ValueError(f"{path}: weights model.py has no place for (biases, norms?): {name}")
    headless = not cfg.tie_embeddings and "lm_head.weight" not in shapes \
        and "embed.weight" in shapes
    if headless and head:
        raise ValueError(f"{path}: missing weights for ['lm_head.weight'] (a base model without "
                         "an LM head: fine-tune it, or use its *ForCausalLM/*ForMaskedLM one)")
    if (cfg.tie_embeddings or headless) and "embed.weight" in shapes:  # some store tied ones twice
        shapes["lm_head.weight"] = shapes["embed.weight"]
    for n in ("embed.weight", "lm_head.weight"):  # rows past its vocabulary: added below
        if n in shapes and shapes[n][0] == n_rows:
            shapes[n] = (cfg.padded_vocab_size, *shapes[n][1:])
    check_fit(cfg, shapes, path)
    state = {}
    for shard in shards:
        for name, weight in load_file(shard).items():
            if (ours := our_name(name)) is not None:
                if not torch.isfinite(weight).all():
                    raise ValueError(f"{shard}: {name} holds NaN or infinite values")
                state[ours] = weight.float()  # fp32: AdamW's small updates vanish in bf16 weights
    if cfg.tie_embeddings or headless:
        state["lm_head.weight"] = state["embed.weight"] * (not headless)
    # New rows (<|mask|>, <|pad|>, padding to a multiple of 64) start as the real rows' mean: an
    # ordinary input (zeros give RMSNorm nothing), and as output the average logit, so by Jensen
    # they take at most new_rows / vocab of the probability (~0.05% for Llama 3), not any share.
    new_rows = cfg.padded_vocab_size - n_rows
    for name in ("embed.weight", "lm_head.weight"):
        if (w := state[name]).size(0) == n_rows:
            state[name] = torch.cat([w, w.mean(0, keepdim=True).expand(new_rows, -1)])
    model = Transformer(cfg)
    model.load_state_dict(state)
    return model
