"""The transformer of "Should We Still Pretrain Encoders with Masked Language Modeling?" (EuroBERT's
Llama architecture). Decoder (CLM) or encoder (MLM) is not a property of the weights but one forward
argument, `causal`: that is what makes the CLM -> MLM switch possible. The forward pass stops at the
hidden states; an objective runs the LM head (`logits`) on the positions it predicts. Also: the
presets, the FLOPs count, AdamW and the learning-rate schedule. docs/pretraining.md."""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTENTION = ("sdpa", "manual")  # how attention is computed: the library's kernel, or written out

@dataclass
class ModelConfig:
    vocab_size: int = 8195  # tokens the tokenizer can produce; the embedding is padded up
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
    attention: str = "sdpa"  # sdpa: F.scaled_dot_product_attention; manual: written out
    rope_scaling: dict | None = None  # Llama 3.1's long-context RoPE, for its checkpoints only

    def __post_init__(self):
        problems = []
        if self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not 1 <= self.n_kv_head <= self.n_head or self.n_head % self.n_kv_head:
            problems.append(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            problems.append(f"head dim {self.n_embd // self.n_head} must be even for RoPE's "
                            "half-split rotation")
        if self.attention not in ATTENTION:
            problems.append(f"attention={self.attention!r} must be 'sdpa' or 'manual'")
        if self.rope_scaling is not None and (self.rope_scaling.get("rope_type") != "llama3"
                                              or set(self.rope_scaling) != LLAMA3_ROPE_KEYS):
            problems.append(f"rope_scaling={self.rope_scaling} must be None or have the keys "
                            f"{sorted(LLAMA3_ROPE_KEYS)}, rope_type 'llama3'")
        if self.vocab_size < 1 or self.block_size < 1:
            problems.append("vocab_size and block_size must be positive")
        if problems:
            raise ValueError("bad ModelConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        # multiples of 64 hit the fast tensor-core tiles; the extra rows are no token, so they only
        # get gradient through the softmax denominator
        return math.ceil(self.vocab_size / 64) * 64

# The paper's three sizes (its architecture table) and two small ones for CPUs; vocab_size always
# comes from the tokenizer: model_config(name, vocab_size=tok.n_vocab)
PRESETS = {
    "test": dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, mlp_hidden=128,
                 block_size=64),  # unit tests
    "tiny": dict(n_layer=4, n_embd=128, n_head=4, n_kv_head=4, mlp_hidden=384,
                 block_size=256),  # CPU demo
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
        # in float32: the mean of squares of bf16 activations loses too many bits
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight

def rope_tables(head_dim: int, length: int, theta: float, scaling: dict | None = None):
    """cos and sin of every (position, frequency), each (length, head_dim): the frequencies repeated
    for both halves, as apply_rope pairs x[i] with x[i + D/2]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32)
                               / head_dim)  # (D/2,)
    if scaling is not None:
        inv_freq = llama3_scaled(inv_freq, **scaling)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (L, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (L, D)
    return angles.cos(), angles.sin()

def apply_rope(x, cos, sin):
    """Rotate each pair (x[i], x[i + D/2]) by its position's angle: Llama's half-split pairs, not
    the RoPE paper's (x[2i], x[2i+1]), so Llama-family weights load unchanged. The dot product of
    two rotated vectors depends on their positions only through the difference: RoPE's point."""
    cos, sin = cos.type_as(x), sin.type_as(x)  # under autocast x is bf16; keep it so
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin

def manual_attention(q, k, v, causal: bool, key_mask=None):
    """What scaled_dot_product_attention computes, written out. q, k, v: (B, H, T, D), the KV heads
    repeated; key_mask: (B, T) bool, True on keys that may be attended to (not padding)."""
    T = q.size(-2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, T, T): query i, key j
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device)
    if causal:
        # query i may only see keys j <= i: the whole difference between CLM and MLM
        allowed = allowed.tril()
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
            # each group of H/KV query heads shares one key/value head: repeat them to match
            k, v = (k.repeat_interleave(H // KV, dim=1),
                    v.repeat_interleave(H // KV, dim=1))  # (B, H, T, D)
            y = manual_attention(q, k, v, causal, key_mask)
        elif key_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=KV != H)
        else:
            # padding needs an explicit mask, and SDPA takes a mask or is_causal, not both
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
        # not parameters and not saved: a function of the config, rebuilt on load
        cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def forward(self, idx, causal: bool = True, attention_mask=None):
        """idx: (B, T) token ids; causal: decoder (True) or encoder (False) attention;
        attention_mask: optional (B, T) bool, False on padding. Returns the final hidden states
        (B, T, C), after the last RMSNorm: `logits()` scores any subset of them."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than "
                             f"block_size={self.config.block_size}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, D)
        x = self.embed(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x, cos, sin, causal, attention_mask)
        return self.norm(x)

    def logits(self, hidden):
        """(..., C) hidden states -> (..., padded_vocab_size) scores. The padding columns are never
        a target; they are left in so the matmul keeps its fast shape."""
        return self.lm_head(hidden)

    def num_params(self) -> dict:
        """Parameter counts. The paper's sizes ("210m" etc.) are body + one embedding matrix at the
        real vocabulary size."""
        cfg = self.config
        embedding = cfg.vocab_size * cfg.n_embd
        body = (sum(p.numel() for p in self.blocks.parameters())
                + sum(p.numel() for p in self.norm.parameters()))
        head = 0 if cfg.tie_embeddings else embedding
        return {"body": body, "embedding": embedding, "lm_head": head, "paper": body + embedding,
                "total": body + embedding + head}

    def flops_per_token(self, seq_len: int, causal: bool, head_fraction: float = 1.0) -> float:
        """Training FLOPs per input token, for MFU: 6 per matmul weight the token passes (2 forward,
        4 backward), plus attention's two T x T matmuls, 12 * n_layer * n_embd * T, halved when
        causal (a kernel skips masked blocks). head_fraction: the share of positions through the LM
        head (CLM 1, MLM about mask_ratio)."""
        n = self.num_params()
        head = self.config.padded_vocab_size * self.config.n_embd
        attention = (12 * self.config.n_layer * self.config.n_embd * seq_len
                     * (0.5 if causal else 1.0))
        return 6 * n["body"] + 6 * head * head_fraction + attention

def lr_at(step: int, peak: float, max_steps: int, warmup_steps: int, decay_steps: int) -> float:
    """Warmup-stable-decay, the paper's schedule: linear warmup, constant, then linear decay to 0
    right after the last step. It spans the whole budget, so the objective switch does not touch
    it. Fine-tuning's (warmup, then decay) is decay_steps = max_steps - warmup_steps."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_start = max_steps - decay_steps
    if step >= decay_start:
        return peak * (max_steps - step) / decay_steps
    return peak

def configure_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95),
                        eps: float = 1e-5):
    """AdamW with the paper's settings. Weight decay regularises the matrices; the RMSNorm gains
    are 1-D scales around 1, which decay towards 0 would only fight: none (nanoGPT's split)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused: a few launches for the whole update, which it can skip on the device (train.py)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)

# Llama 3.1's context extension, which only its Hugging Face checkpoints need (mlm_vs_clm/hf.py)

LLAMA3_ROPE_KEYS = {"rope_type", "factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings"}

def llama3_scaled(inv_freq, factor, low_freq_factor, high_freq_factor,
                  original_max_position_embeddings, rope_type="llama3"):
    """Wavelengths longer than original / low_freq_factor are stretched by `factor` (so that longer
    contexts stay in the seen range of angles), those below original / high_freq_factor are kept,
    the band between interpolated."""
    wavelen = 2 * math.pi / inv_freq
    smooth = ((original_max_position_embeddings / wavelen - low_freq_factor)
              / (high_freq_factor - low_freq_factor)).clamp(0, 1)  # 0: long waves, 1: short waves
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq
