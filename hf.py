"""
Hugging Face checkpoints in and out, without transformers at run time (safetensors and JSON only).

In: a local Llama-architecture checkpoint directory (config.json + model.safetensors, or shards with
their model.safetensors.index.json): Llama 2/3/3.1, SmolLM-style small Llamas, EuroBERT (the paper's
released MLMvsCLM checkpoints, and our own exports) and Mistral without a sliding window. Out
(hf_export.py): any of our checkpoints as an encoder (EuroBertForMaskedLM, with
sentence-transformers files), a decoder (LlamaForCausalLM) or a fine-tuned model with its head. The
tokenizer side is in hf_tokenizer.py.

    python train.py --init_from=hf:DIR --tokenizer=hf:DIR ...   # continued pretraining from it
    python train.py --out_dir=out/run --export=hf               # out/run/hf/, kind from the run
    python hf.py --init_from=out/run/ckpt_2000.pt --out_dir=out/run/hf_2000 [--kind=encoder]
    python hf.py --init_from=out/run/sst2/model.pt              # a fine-tuned model, with its head

Each export prints the kind written and what to load it with, e.g.

    out/run/hf: encoder (its last step trained MLM), written as EuroBertForMaskedLM; load it with no
    custom code:
      AutoModelForMaskedLM.from_pretrained('out/run/hf'), or pipeline('fill-mask', model=...)
      ...
"""

import json
import os
import re
import sys
from dataclasses import dataclass

import torch

from data import TOKENIZER_FIELDS, get_tokenizer
from model import LLAMA3_ROPE_KEYS, ModelConfig, Transformer
from settings import configure


@dataclass
class ExportConfig:
    init_from: str = ""  # the checkpoint: out/run/ckpt.pt, ckpt_<step>.pt, a fine-tuned model.pt
    out_dir: str = ""  # directory to write; "": hf/ beside ckpt.pt, hf_<name>/ beside other files
    kind: str = "auto"  # auto: from the checkpoint (hf_export.py's table); or encoder, decoder


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
    from safetensors import SafetensorError
    from safetensors.torch import load_file
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


def checkpoint_tokenizer(ckpt: dict, path: str):
    """The tokenizer one of our checkpoints was trained with, checked to be that one still: an hf:
    tokenizer's files may have changed since, and then every token id would mean another token."""
    meta = ckpt.get("tokenizer")
    if not isinstance(meta, dict) or not isinstance(meta.get("tokenizer"), str):
        raise ValueError(f"{path} does not name its tokenizer (no 'tokenizer' entry): not a "
                         "checkpoint train.py or finetune.py wrote")
    try:
        tok = get_tokenizer(meta["tokenizer"])
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} was trained with the tokenizer {meta['tokenizer']}, which cannot "
                         f"be read here: {e}") from None
    diffs = [f"{k} {tok.meta().get(k)!r} here, {meta.get(k)!r} in the checkpoint"
             for k in TOKENIZER_FIELDS if tok.meta().get(k) != meta.get(k)]
    if diffs:
        raise ValueError(f"{path} was trained with the tokenizer {meta['tokenizer']}, and the one "
                         f"here differs ({'; '.join(diffs)}): its token ids would mean other "
                         "tokens; restore the tokenizer files it was trained with")
    return tok


def export_hf(ckpt_path: str, out_dir: str, kind: str = "auto", quiet: bool = False) -> str:
    """One of our checkpoints -> a Hugging Face directory that transformers loads with no custom
    code: an encoder, a decoder or a fine-tuned model (hf_export.py); kind "auto" lets the
    checkpoint decide. Prints what was written and what to load it with; returns out_dir."""
    from hf_export import export  # the way out, which uses this file's names
    done = export(ckpt_path, out_dir, kind)
    if not quiet:
        print(done.usage())
    return done.out_dir


def default_out_dir(ckpt_path: str) -> str:
    stem = os.path.splitext(os.path.basename(ckpt_path))[0]
    return os.path.join(os.path.dirname(ckpt_path), "hf" if stem == "ckpt" else f"hf_{stem}")


def main(argv: list[str]):
    cfg = configure(ExportConfig, argv)
    if not cfg.init_from:
        raise SystemExit("error: --init_from=CHECKPOINT is required (e.g. out/demo/ckpt.pt); "
                         "see --help")
    if cfg.init_from.startswith("hf:") or os.path.isdir(cfg.init_from):
        raise SystemExit(f"error: --init_from={cfg.init_from} is a directory: give one of our "
                         "checkpoint files (out_dir/ckpt.pt, ckpt_<step>.pt, a fine-tuned "
                         "model.pt); a Hugging Face directory needs no export")
    try:
        export_hf(cfg.init_from, cfg.out_dir or default_out_dir(cfg.init_from), cfg.kind)
    except (ValueError, OSError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
