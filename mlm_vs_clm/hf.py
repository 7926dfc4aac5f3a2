"""Hugging Face checkpoints in, without transformers (safetensors and JSON only): Llama 2/3/3.1,
SmolLM-style small Llamas, EuroBERT (our own exports too) and Mistral without a sliding window,
mapped onto model.py's names. The way out is export.py. docs/huggingface.md.
"""

import json
import os
import re

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from model import LLAMA3_ROPE_KEYS, ModelConfig, Transformer

# mistral: only without a sliding window, i.e. a Llama
SUPPORTED_MODEL_TYPES = ("llama", "eurobert", "mistral")
TOP_NAMES = {"embed_tokens.weight": "embed.weight", "norm.weight": "norm.weight",
             "lm_head.weight": "lm_head.weight"}
LAYER_NAMES = {"input_layernorm.weight": "attn_norm.weight",
               "post_attention_layernorm.weight": "mlp_norm.weight",
               **{f"self_attn.{p}_proj.weight": f"attn.{p}_proj.weight" for p in "qkvo"},
               **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}}
# HF Llama stores q/k in the half-split RoPE layout (its conversion script permuted Meta's
# interleaved weights once), which is model.py's layout too: no permutation either way.


def our_name(hf_name: str) -> str | None:
    # *ForCausalLM / *ForMaskedLM prefix the body; a bare *Model does not
    name = hf_name.removeprefix("model.")
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m:
        return f"blocks.{m[1]}.{LAYER_NAMES[m[2]]}" if m[2] in LAYER_NAMES else None
    return TOP_NAMES.get(name)


def hf_name(name: str) -> str:
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if m:
        return f"model.layers.{m[1]}." + {v: k for k, v in LAYER_NAMES.items()}[m[2]]
    return name if name == "lm_head.weight" \
        else "model." + {v: k for k, v in TOP_NAMES.items()}[name]


def model_config_from_hf(hf: dict, config_path: str, vocab_size: int) -> ModelConfig:
    """config.json -> ModelConfig, or a ValueError naming everything model.py cannot represent."""
    problems = []
    if hf.get("model_type") not in SUPPORTED_MODEL_TYPES:
        problems.append(f"model_type {hf.get('model_type')!r} "
                        f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            problems.append(f"{key}=true (model.py's linear layers have no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf.get('hidden_act')!r} (model.py's MLP is SwiGLU: silu)")
    if hf.get("sliding_window") is not None and hf.get("use_sliding_window", True):
        problems.append(f"sliding_window={hf['sliding_window']} "
                        "(model.py attends to the whole sequence)")
    # transformers >= 5 writes rope_parameters (theta inside); older versions
    # rope_theta + rope_scaling.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        problems.append(f"rope type {rope_type!r} "
                        "(model.py has plain RoPE and Llama 3.1's 'llama3' scaling)")
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        problems.append("partial_rotary_factor != 1 (model.py rotates the whole head)")
    try:
        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
        if (hf.get("head_dim") or hidden // heads) * heads != hidden:
            problems.append(f"head_dim {hf.get('head_dim')} != hidden_size / num_attention_heads = "
                            f"{hidden / heads:g}")
        if problems:
            raise ValueError(f"{config_path}: model.py cannot represent this model: "
                             + "; ".join(problems))
        return ModelConfig(vocab_size=vocab_size, n_layer=hf["num_hidden_layers"], n_embd=hidden,
                           n_head=heads, n_kv_head=hf.get("num_key_value_heads") or heads,
                           mlp_hidden=hf["intermediate_size"],
                           block_size=hf.get("max_position_embeddings", 2048),
                           rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                           norm_eps=hf.get("rms_norm_eps", 1e-6),
                           tie_embeddings=hf.get("tie_word_embeddings", False),
                           init_std=hf.get("initializer_range", 0.02),
                           rope_scaling={k: rope[k] for k in ("rope_type", *LLAMA3_ROPE_KEYS)}
                           if rope_type == "llama3" else None)
    except KeyError as e:
        raise ValueError(f"{config_path}: no {e.args[0]!r}: not a Llama-style config") from None


def read_weights(path: str) -> dict:
    """All tensors of model.safetensors, or of every shard model.safetensors.index.json lists."""
    single, index = (os.path.join(path, "model.safetensors"),
                     os.path.join(path, "model.safetensors.index.json"))
    if os.path.exists(single):
        files = [single]
    elif os.path.exists(index):
        with open(index) as f:
            files = [os.path.join(path, name)
                     for name in sorted(set(json.load(f)["weight_map"].values()))]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are not there: {missing}: "
                                    "download all of them")
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                "(pickled pytorch_model.bin files are not read: re-save the model "
                                "with safetensors)")
    weights = {}
    for file in files:
        try:
            weights.update(load_file(file))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: unreadable safetensors file ({e}): "
                             "truncated or corrupt download?") from None
    return weights


def load_hf(path: str, tok) -> Transformer:
    """A Transformer holding the checkpoint in directory `path`, sized for `tok` (its own tokenizer,
    from data.get_tokenizer('hf:' + path), which may add <|mask|> and <|pad|> after the checkpoint's
    vocabulary)."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: hf:PATH must be a Hugging Face "
                                "checkpoint directory (config.json and model.safetensors "
                                "or its shards)")
    with open(config_path) as f:
        hf = json.load(f)
    cfg = model_config_from_hf(hf, config_path, tok.n_vocab)
    n_rows = hf.get("vocab_size")
    if n_rows != tok.base_vocab:
        raise ValueError(f"{config_path}: vocab_size {n_rows}, but the tokenizer {tok.name} has "
                         f"{tok.base_vocab} ids: the embedding and the tokenizer must come from "
                         "the same checkpoint")
    state, unknown = {}, []
    for name, weight in read_weights(path).items():
        ours = our_name(name)
        # old files saved the RoPE table
        if ours is None and not name.endswith("rotary_emb.inv_freq"):
            unknown.append(name)
        elif ours is not None:
            # float32 master weights: train.py runs bf16 autocast over fp32 parameters, and AdamW's
            # small updates vanish when added to bf16 weights. Export writes float32 too; cast there
            # if you want smaller files.
            state[ours] = weight.float()
    if unknown:
        raise ValueError(f"{path}: weights model.py has no place for (biases, extra norms?): "
                         f"{unknown[:6]}")
    if cfg.tie_embeddings:
        # one matrix; some files store it twice, some once
        state["lm_head.weight"] = state.get("embed.weight")
    model = Transformer(cfg)
    expected = model.state_dict()
    missing = sorted(k for k in expected if state.get(k) is None)
    if missing:
        headless = " (a base model without an LM head: use its *ForCausalLM/*ForMaskedLM " \
            "checkpoint)" if "lm_head.weight" in missing else ""
        raise ValueError(f"{path}: missing weights for {missing[:6]}{headless}")
    for name in ("embed.weight", "lm_head.weight"):
        w = state[name]
        # New rows (our <|mask|>/<|pad|>, then the padding to a multiple of 64) start as the mean of
        # the real rows: as an input, the mask embedding is then an ordinary-looking vector (zeros
        # would hit RMSNorm with nothing), and as an output its logit is the average logit, so by
        # Jensen the extra columns take at most new_rows / vocab of the probability mass (about
        # 0.05% for Llama 3) instead of an arbitrary share.
        if w.dim() == 2 and w.size(0) == n_rows:
            state[name] = torch.cat(
                [w, w.mean(0, keepdim=True).expand(cfg.padded_vocab_size - n_rows, -1)])
    for name, w in state.items():
        if w.shape != expected[name].shape:
            raise ValueError(f"{path}: {hf_name(name)} has shape {tuple(w.shape)}, "
                             f"config.json implies {tuple(expected[name].shape)}")
    model.load_state_dict(state)
    return model
