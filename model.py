"""
The encoder/decoder transformer of "Should We Still Pretrain Encoders with Masked Language Modeling?".

One network, the EuroBERT / Llama architecture the paper uses for every run: pre-norm RMSNorm, rotary position
embeddings, grouped-query attention, SwiGLU MLP, no biases, no dropout. Whether it is a decoder (CLM) or an encoder
(MLM, fine-tuning) is not a property of the weights but of one argument of the forward pass: `causal`. That is what
makes the paper's CLM -> MLM switch and its continued pretraining possible: the same weights run both ways.

The forward pass stops at the final hidden states; `logits()` is a separate step so that an objective can run the
(large) LM head on only the positions it predicts.
"""

import json
import math
import os
import pickle
import re
import zipfile
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


LLAMA3_ROPE_KEYS = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}


@dataclass
class ModelConfig:
    vocab_size: int = 8195  # tokens the tokenizer can produce; the embedding is padded up (see padded_vocab_size)
    n_layer: int = 4  # transformer blocks
    n_embd: int = 256  # model width, d_model
    n_head: int = 4  # query heads; head dim = n_embd // n_head
    n_kv_head: int = 4  # key/value heads (grouped-query attention when < n_head)
    mlp_hidden: int = 1024  # SwiGLU hidden width
    block_size: int = 2048  # longest sequence RoPE tables are built for (the paper's context)
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the input embedding with the LM head (the paper does not)
    init_std: float = 0.02  # std of the normal init of every matrix
    attention: str = "sdpa"  # "sdpa": F.scaled_dot_product_attention; "manual": explicit scores, mask and softmax
    rope_scaling: dict | None = None  # None, or Llama 3.1's {"rope_type": "llama3", factor, low_freq_factor, ...}

    def __post_init__(self):
        problems = []
        if self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not 1 <= self.n_kv_head <= self.n_head or self.n_head % self.n_kv_head:
            problems.append(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            problems.append(f"head dim {self.n_embd // self.n_head} must be even for RoPE's half-split rotation")
        if self.attention not in ("sdpa", "manual"):
            problems.append(f"attention={self.attention!r} must be 'sdpa' or 'manual'")
        if self.rope_scaling is not None and (self.rope_scaling.get("rope_type") != "llama3"
                                              or not LLAMA3_ROPE_KEYS <= set(self.rope_scaling)):
            problems.append(f"rope_scaling={self.rope_scaling} must be None or rope_type 'llama3' with "
                            f"{sorted(LLAMA3_ROPE_KEYS)}")
        if self.vocab_size < 1 or self.block_size < 1:
            problems.append("vocab_size and block_size must be positive")
        if problems:
            raise ValueError("bad ModelConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        # Matmuls whose dimensions are multiples of 64 hit the fast tensor-core tiles; the extra rows are never
        # produced by the tokenizer, so they only ever receive gradient through the softmax denominator.
        return math.ceil(self.vocab_size / 64) * 64


# The paper's three sizes (its architecture table, exactly) and two small ones for CPUs. vocab_size is left at the
# dataclass default: it always comes from the tokenizer (`model_config(name, vocab_size=tok.n_vocab)`).
PRESETS = {
    "test": dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, mlp_hidden=128, block_size=64),  # unit tests
    "tiny": dict(n_layer=4, n_embd=128, n_head=4, n_kv_head=4, mlp_hidden=384, block_size=256),  # CPU demo
    "210m": dict(n_layer=12, n_embd=768, n_head=12, n_kv_head=12, mlp_hidden=3072),
    "610m": dict(n_layer=26, n_embd=1152, n_head=18, n_kv_head=6, mlp_hidden=4096),
    "1b": dict(n_layer=28, n_embd=1728, n_head=18, n_kv_head=6, mlp_hidden=5120),
}


def model_config(preset: str, **overrides) -> ModelConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[preset], **overrides})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32: the mean of squares of bf16 activations loses too many bits.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(head_dim: int, length: int, theta: float, scaling: dict | None = None):
    """cos and sin of every (position, frequency) pair, each (length, head_dim), the frequencies repeated for both
    halves so that they line up with `rotate_half`."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (D/2,)
    if scaling is not None:
        # Llama 3.1's context extension: wavelengths longer than the original context / low_freq_factor are
        # stretched by `factor` (positions beyond what pretraining saw then stay in the seen range of angles), those
        # shorter than original / high_freq_factor (local order) are kept, and the band between is interpolated.
        old_context, factor = scaling["original_max_position_embeddings"], scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_context / wavelen - low) / (high - low)).clamp(0, 1)  # 0: long waves, 1: short waves
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (L, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (L, D)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x[i], x[i + D/2]) by its position's angle: the half-split convention of Llama and EuroBERT
    (GPT-NeoX), not the interleaved (x[2i], x[2i+1]) pairs of the RoPE paper. Both are rotations; only the half-split
    one loads Llama-family weights unchanged. The dot product of two rotated vectors depends on their positions only
    through the difference, which is the point of RoPE."""
    cos, sin = cos.type_as(x), sin.type_as(x)  # under autocast x is bf16; keep it so
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def manual_attention(q, k, v, causal: bool, key_mask=None):
    """What scaled_dot_product_attention computes, written out. q: (B, H, T, D); k, v: (B, H, T, D) with KV heads
    already repeated; key_mask: (B, T) bool, True for keys that may be attended to (not padding)."""
    T = q.size(-2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, T, T): query i against key j
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()  # query i may only see keys j <= i: the whole difference between CLM and MLM
    allowed = allowed.view(1, 1, T, T)
    if key_mask is not None:
        allowed = allowed & key_mask.view(-1, 1, 1, T)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.float().softmax(dim=-1).type_as(q) @ v  # (B, H, T, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        kv_dim = cfg.n_kv_head * cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, causal: bool, key_mask=None):
        B, T, C = x.shape
        H, KV, D = self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, KV, D).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(B, T, KV, D).transpose(1, 2)  # (B, KV, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cfg.attention == "manual":
            # Each group of H/KV query heads shares one key/value head: repeat the KV heads to match.
            k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)  # (B, H, T, D)
            y = manual_attention(q, k, v, causal, key_mask)
        elif key_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=KV != H)
        else:
            # Padding needs an explicit boolean mask, and SDPA takes either a mask or is_causal, not both.
            allowed = key_mask.view(B, 1, 1, T)
            if causal:
                allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=KV != H)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, causal: bool, key_mask=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, causal, key_mask)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # Not parameters and not saved: they are a function of the config, rebuilt on load.
        cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def forward(self, idx, causal: bool = True, attention_mask=None):
        """idx: (B, T) token ids; causal: decoder (True) or encoder (False) attention; attention_mask: optional (B, T)
        bool, True on real tokens, False on padding that no query may attend to. Returns the final hidden states
        (B, T, C), after the last RMSNorm: `logits()` turns any subset of them into vocabulary scores."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size={self.config.block_size}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, D)
        x = self.embed(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x, cos, sin, causal, attention_mask)
        return self.norm(x)

    def logits(self, hidden):
        """(..., C) hidden states -> (..., padded_vocab_size) scores. The padding columns are never a target; they are
        left in so the matmul keeps its fast shape."""
        return self.lm_head(hidden)

    def num_params(self) -> dict:
        """Parameter counts. The paper's sizes ("210m" etc.) are body + one embedding matrix, counted at the real
        vocabulary size (not the padded one)."""
        cfg = self.config
        embedding = cfg.vocab_size * cfg.n_embd
        body = sum(p.numel() for p in self.blocks.parameters()) + sum(p.numel() for p in self.norm.parameters())
        head = 0 if cfg.tie_embeddings else embedding
        return {"body": body, "embedding": embedding, "lm_head": head, "paper": body + embedding,
                "total": body + embedding + head}

    def flops_per_token(self, seq_len: int, causal: bool, head_fraction: float = 1.0) -> float:
        """Training FLOPs (forward + backward) per input token, for MFU. Convention: 6 FLOPs per parameter per token
        for every matmul weight the token passes through (2 forward, 4 backward; embedding lookups are free), plus
        attention's two T x T matmuls, 12 * n_layer * n_embd * T per token, halved when causal since a kernel that
        skips masked blocks does half the work. head_fraction is the share of positions that run the LM head: 1 for
        CLM, about mask_ratio for MLM with sparse prediction. Counts the work the step really needs, nothing else."""
        n = self.num_params()
        head = self.config.padded_vocab_size * self.config.n_embd
        attention = 12 * self.config.n_layer * self.config.n_embd * seq_len * (0.5 if causal else 1.0)
        return 6 * n["body"] + 6 * head * head_fraction + attention


def configure_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95), eps: float = 1e-5,
                        device_type: str = "cpu"):
    """AdamW with the paper's settings. Weight decay pulls matrices (linear layers and embeddings) towards zero, which
    regularises; the RMSNorm gains are 1-D scales around 1, and decaying them towards 0 would only fight the
    normalisation, so they get none (nanoGPT's and the Llama recipe's split, by dimension)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel does the whole update in a few launches instead of several per parameter.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device_type == "cuda")



# Every checkpoint train.py writes is a dict with this tag, the model config as a plain dict (so the model rebuilds
# exactly from the file alone) and the weights; train.py adds the optimizer, data position and RNG state to resume.
CHECKPOINT_FORMAT = "mlm-vs-clm/1"


def checkpoint_payload(model: "Transformer", state_dict: dict | None = None, **extra) -> dict:
    """state_dict: the full weights where model.state_dict() holds only this process's shards (FSDP)."""
    return {"format": CHECKPOINT_FORMAT, "model_config": asdict(model.config),
            "model": model.state_dict() if state_dict is None else state_dict, **extra}


def read_checkpoint(path: str, device="cpu") -> dict:
    """The dict in one of our checkpoint files, memory-mapped (its tensors are read when used), checked to be ours.
    Only tensors and plain containers are unpickled (weights_only=True): a checkpoint someone hands you cannot run
    code on your machine."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive whose directory is at its very end
        raise ValueError(f"{path} is not a complete PyTorch checkpoint (no zip directory at its end): a truncated "
                         "copy, or not a checkpoint at all; give a ckpt.pt that train.py wrote")
    try:
        # mmap: under FSDP every process loads the full checkpoint; mapped, they share one copy in the page cache
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} holds Python objects other than tensors and plain containers; they were not "
                         "loaded, since unpickling them could run code: only checkpoints train.py wrote are read") \
            from None
    except Exception as e:  # noqa: BLE001: a damaged archive fails in many ways, all with one cure
        raise ValueError(f"{path} is a damaged checkpoint ({str(e).splitlines()[0][:100]}): copy it again, or "
                         "use an earlier one") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint of this project (no format tag {CHECKPOINT_FORMAT!r}); "
                         f"train.py writes them as out_dir/ckpt.pt")
    return ckpt


def load_checkpoint(path: str, device="cpu"):
    """Rebuild a model from one of our checkpoints; returns (model, the whole checkpoint dict)."""
    ckpt = read_checkpoint(path, device)
    known = {f.name for f in fields(ModelConfig)}
    unknown = set(ckpt["model_config"]) - known
    if unknown:
        raise ValueError(f"{path} has model config fields this code does not know: {sorted(unknown)}")
    try:
        model = Transformer(ModelConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError) as e:  # an edited file: its config and weights no longer agree
        raise ValueError(f"{path}: its weights do not fit its model config ({str(e).splitlines()[0][:160]})") \
            from None
    return model.to(device), ckpt


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face checkpoints in and out, without transformers at run time (safetensors is imported where it is used).
#
# In: a local Llama-architecture checkpoint directory (config.json + model.safetensors, or shards with their
# model.safetensors.index.json): Llama 2/3/3.1, SmolLM-style small Llamas, EuroBERT and the paper's released
# MLMvsCLM checkpoints. Out: any of our checkpoints as a Llama directory that transformers loads without custom code.

SUPPORTED_MODEL_TYPES = ("llama", "eurobert", "mistral")  # mistral: only without a sliding window, i.e. a Llama
TOP_NAMES = {"embed_tokens.weight": "embed.weight", "norm.weight": "norm.weight", "lm_head.weight": "lm_head.weight"}
LAYER_NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "mlp_norm.weight",
               **{f"self_attn.{p}_proj.weight": f"attn.{p}_proj.weight" for p in "qkvo"},
               **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}}
# HF Llama stores q/k in the half-split RoPE layout (its conversion script permuted Meta's interleaved weights
# once), which is model.py's layout too: no permutation either way.


def our_name(hf_name: str) -> str | None:
    name = hf_name.removeprefix("model.")  # *ForCausalLM / *ForMaskedLM prefix the body; a bare *Model does not
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m:
        return f"blocks.{m[1]}.{LAYER_NAMES[m[2]]}" if m[2] in LAYER_NAMES else None
    return TOP_NAMES.get(name)


def hf_name(name: str) -> str:
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if m:
        return f"model.layers.{m[1]}." + {v: k for k, v in LAYER_NAMES.items()}[m[2]]
    return name if name == "lm_head.weight" else "model." + {v: k for k, v in TOP_NAMES.items()}[name]


def model_config_from_hf(hf: dict, config_path: str, vocab_size: int) -> ModelConfig:
    """config.json -> ModelConfig, or a ValueError naming everything model.py cannot represent."""
    problems = []
    if hf.get("model_type") not in SUPPORTED_MODEL_TYPES:
        problems.append(f"model_type {hf.get('model_type')!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            problems.append(f"{key}=true (model.py's linear layers have no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf.get('hidden_act')!r} (model.py's MLP is SwiGLU: silu)")
    if hf.get("sliding_window") is not None and hf.get("use_sliding_window", True):
        problems.append(f"sliding_window={hf['sliding_window']} (model.py attends to the whole sequence)")
    # transformers >= 5 writes rope_parameters (theta inside); older versions rope_theta + rope_scaling.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        problems.append(f"rope type {rope_type!r} (model.py has plain RoPE and Llama 3.1's 'llama3' scaling)")
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        problems.append("partial_rotary_factor != 1 (model.py rotates the whole head)")
    try:
        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
        if (hf.get("head_dim") or hidden // heads) * heads != hidden:
            problems.append(f"head_dim {hf.get('head_dim')} != hidden_size / num_attention_heads = {hidden / heads:g}")
        if problems:
            raise ValueError(f"{config_path}: model.py cannot represent this model: " + "; ".join(problems))
        return ModelConfig(vocab_size=vocab_size, n_layer=hf["num_hidden_layers"], n_embd=hidden, n_head=heads,
                           n_kv_head=hf.get("num_key_value_heads") or heads, mlp_hidden=hf["intermediate_size"],
                           block_size=hf.get("max_position_embeddings", 2048),
                           rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                           norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
                           init_std=hf.get("initializer_range", 0.02),
                           rope_scaling={k: rope[k] for k in ("rope_type", *LLAMA3_ROPE_KEYS)}
                           if rope_type == "llama3" else None)
    except KeyError as e:
        raise ValueError(f"{config_path}: no {e.args[0]!r}: not a Llama-style config") from None


def read_weights(path: str) -> dict:
    """All tensors of model.safetensors, or of every shard model.safetensors.index.json lists."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        files = [single]
    elif os.path.exists(index):
        with open(index) as f:
            files = [os.path.join(path, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are not there: {missing}: download all of them")
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json (pickled "
                                "pytorch_model.bin files are not read: re-save the model with safetensors)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    weights = {}
    for file in files:
        try:
            weights.update(load_file(file))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: unreadable safetensors file ({e}): truncated or corrupt download?") from None
    return weights


def load_hf(path: str, tok) -> Transformer:
    """A Transformer holding the checkpoint in directory `path`, sized for `tok` (its own tokenizer, from
    data.get_tokenizer('hf:' + path), which may add <|mask|> and <|pad|> after the checkpoint's vocabulary)."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: hf:PATH must be a Hugging Face checkpoint directory "
                                "(config.json and model.safetensors or its shards)")
    with open(config_path) as f:
        hf = json.load(f)
    cfg = model_config_from_hf(hf, config_path, tok.n_vocab)
    n_rows = hf.get("vocab_size")
    if n_rows != tok.base_vocab:
        raise ValueError(f"{config_path}: vocab_size {n_rows}, but the tokenizer {tok.name} has {tok.base_vocab} "
                         "ids: the embedding and the tokenizer must come from the same checkpoint")
    state, unknown = {}, []
    for name, weight in read_weights(path).items():
        ours = our_name(name)
        if ours is None and not name.endswith("rotary_emb.inv_freq"):  # old files saved the RoPE table
            unknown.append(name)
        elif ours is not None:
            # float32 master weights: train.py runs bf16 autocast over fp32 parameters, and AdamW's small updates
            # vanish when added to bf16 weights. Export writes float32 too; cast there if you want smaller files.
            state[ours] = weight.float()
    if unknown:
        raise ValueError(f"{path}: weights model.py has no place for (biases, extra norms?): {unknown[:6]}")
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state.get("embed.weight")  # one matrix; some files store it twice, some once
    model = Transformer(cfg)
    expected = model.state_dict()
    missing = sorted(k for k in expected if state.get(k) is None)
    if missing:
        headless = " (a base model without an LM head: use its *ForCausalLM/*ForMaskedLM checkpoint)" \
            if "lm_head.weight" in missing else ""
        raise ValueError(f"{path}: missing weights for {missing[:6]}{headless}")
    for name in ("embed.weight", "lm_head.weight"):
        w = state[name]
        # New rows (our <|mask|>/<|pad|>, then the padding to a multiple of 64) start as the mean of the real rows:
        # as an input, the mask embedding is then an ordinary-looking vector (zeros would hit RMSNorm with nothing),
        # and as an output its logit is the average logit, so by Jensen the extra columns take at most
        # new_rows / vocab of the probability mass (about 0.05% for Llama 3) instead of an arbitrary share.
        if w.dim() == 2 and w.size(0) == n_rows:
            state[name] = torch.cat([w, w.mean(0, keepdim=True).expand(cfg.padded_vocab_size - n_rows, -1)])
    for name, w in state.items():
        if w.shape != expected[name].shape:
            raise ValueError(f"{path}: {hf_name(name)} has shape {tuple(w.shape)}, config.json implies "
                             f"{tuple(expected[name].shape)}")
    model.load_state_dict(state)
    return model


def export_hf(ckpt_path: str, out_dir: str) -> str:
    """One of our checkpoints -> a Llama directory (config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json) that transformers loads with LlamaForCausalLM, no custom code."""
    from safetensors.torch import save_file
    from data import check_tokenizer, get_tokenizer, tokenizer_json
    model, ckpt = load_checkpoint(ckpt_path)
    cfg = model.config
    tok = get_tokenizer(ckpt["tokenizer"]["tokenizer"])
    # an hf: tokenizer's files may have changed since training
    check_tokenizer(tok.meta(), ckpt["tokenizer"], ckpt_path, f"the tokenizer {tok.name} here")
    os.makedirs(out_dir, exist_ok=True)
    state = {hf_name(name): (w[:cfg.vocab_size] if name in ("embed.weight", "lm_head.weight") else w).contiguous()
             for name, w in model.state_dict().items() if not (cfg.tie_embeddings and name == "lm_head.weight")}
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False, "mlp_bias": False, "initializer_range": cfg.init_std, "torch_dtype": "float32",
        "bos_token_id": None, "eos_token_id": tok.eot_id, "pad_token_id": tok.pad_id, "mask_token_id": tok.mask_id,
    }
    names = {i: s for s, i in tok.encoding._special_tokens.items()}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size,
                        "eos_token": names[tok.eot_id], "mask_token": names[tok.mask_id],
                        "pad_token": names[tok.pad_id]}
    for file, content in (("config.json", config), ("tokenizer.json", tokenizer_json(tok)),
                          ("tokenizer_config.json", tokenizer_config)):
        with open(os.path.join(out_dir, file), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=1, ensure_ascii=False)
    return out_dir
