"""The two pretraining objectives the paper compares, and when each runs: the only file that masks
tokens or computes a pretraining loss. CLM predicts every next token, attention looking left
only; MLM hides a random `mask_ratio` of the tokens and predicts them from both sides.

    loss, n_predicted = pretraining_loss(model, tokens, "mlm", vocab, generator=g)

`tokens` is a (B, T) batch of packed token blocks, as data.py's loader yields them."""

import math
from dataclasses import dataclass

import torch

OBJECTIVES = ("clm", "mlm")
MASK_REPLACE = ("mask", "bert")
IGNORE = -100  # label of a position that is not predicted (F.cross_entropy's default ignore_index)

@dataclass(frozen=True)
class Vocab:
    """What the objectives need to know about the tokenizer."""
    size: int  # number of token ids the tokenizer produces (ids 0 .. size-1)
    mask_id: int  # <|mask|>
    special_ids: tuple  # never masked, never a random replacement
    pad_id: int | None = None  # never a target (packed pretraining blocks have none)

def check_shape(tokens, min_length: int):
    """A batch the loss can read. The ids themselves were checked once, by data.BlockLoader on the
    host: here that would cost a host sync per micro-batch."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 \
            or tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"tokens must be a (batch, length) integer tensor, got "
                         f"{getattr(tokens, 'dtype', type(tokens))} of shape "
                         f"{tuple(getattr(tokens, 'shape', ()))}")
    if tokens.size(1) < min_length:
        raise ValueError(f"tokens has length {tokens.size(1)}; at least {min_length} are needed to "
                         "predict anything")

def switch_step(switch_to: str, switch_at: float, max_steps: int) -> int | None:
    """The first step of the second objective, or None for a single-objective run: switch_at is a
    fraction of the budget if < 1 (the paper's 0.25, 0.5, 0.75), else a step."""
    if switch_to == "none":
        return None
    return round(switch_at * max_steps) if switch_at < 1 else int(switch_at)

def mask_draws(shape, mask_replace: str, generator=None, device=None) -> list:
    """The uniform numbers MLM masking uses, one (B, T) tensor per decision (selection; for BERT's
    rule also the replacement roll and the random token). Drawn on the generator's device, so a seed
    gives the same masks anywhere, and outside compiled code, which cannot trace a Generator."""
    draw_device = generator.device if generator is not None else device
    return [torch.rand(shape, generator=generator, device=draw_device).to(device)
            for _ in range(1 if mask_replace == "mask" else 3)]

def mask_tokens(tokens, vocab: Vocab, mask_ratio: float = 0.4, mask_replace: str = "mask",
                generator=None, draws=None):
    """The MLM corruption. Each non-special token is selected independently with probability
    mask_ratio (the paper's 0.4; BERT's 0.15) and becomes <|mask|> ("mask", the paper's code) or,
    BERT's rule ("bert"), <|mask|> 80%, a random ordinary token 10%, unchanged 10%. Returns
    (inputs, labels), both (B, T); labels are IGNORE where not selected."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    if mask_replace not in MASK_REPLACE:
        raise ValueError(f"mask_replace must be one of {MASK_REPLACE}, got {mask_replace!r}")
    if draws is None:
        draws = mask_draws(tokens.shape, mask_replace, generator, tokens.device)
    special, ordinary = token_sets(vocab, tokens.device)
    selected = (draws[0] < mask_ratio) & ~torch.isin(tokens, special)  # (B, T) bool
    labels = torch.where(selected, tokens, IGNORE)
    inputs = tokens.masked_fill(selected, vocab.mask_id)
    if mask_replace == "bert":
        roll = draws[1]  # one draw decides between the three outcomes
        pick = (draws[2] * len(ordinary)).long().clamp_(max=len(ordinary) - 1)
        inputs = torch.where(selected & (roll >= 0.8) & (roll < 0.9), ordinary[pick], inputs)
        inputs = torch.where(selected & (roll >= 0.9), tokens, inputs)
    return inputs, labels

_token_sets = {}

def token_sets(vocab: Vocab, device) -> tuple:
    """(special ids, ordinary ids) on the device, built once, not copied over per micro-batch."""
    key = (vocab, str(device))
    if key not in _token_sets:
        special = torch.tensor(vocab.special_ids)
        ordinary = torch.tensor([i for i in range(vocab.size) if i not in vocab.special_ids])
        _token_sets[key] = special.to(device), ordinary.to(device)
    return _token_sets[key]

class LinearCrossEntropy(torch.autograd.Function):
    """The LM head and the cross-entropy in one: the summed loss of cross_entropy(hidden @ weight.T,
    labels) over the rows whose label is not IGNORE, computed a chunk of rows at a time, so that no
    (tokens x vocabulary) logits ever exist. Each chunk's gradients are computed while its logits
    are at hand (softmax minus the one-hot target), so the backward pass only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, with_grads: bool):
        loss = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.zeros_like(hidden) if with_grads else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if with_grads else None
        rows = hidden.size(1)  # a chunk of logits is as large as the LM head itself
        for start in range(0, hidden.size(0), rows):
            h, y = hidden[start:start + rows], labels[start:start + rows]  # (R, C), (R,)
            logits = (h @ weight.T).float()  # (R, V); bf16 under autocast, as the head would be
            valid = (y != IGNORE).unsqueeze(1)  # (R, 1)
            target = torch.where(valid.squeeze(1), y, 0).unsqueeze(1)
            top = logits.amax(-1, keepdim=True)
            exp = (logits - top).exp_()  # one pass for the loss and the softmax
            total = exp.sum(-1, keepdim=True)
            loss = loss + ((total.log() + top - logits.gather(1, target)) * valid).sum()
            if with_grads:
                dlogits = exp.mul_(valid / total)  # softmax, zero on ignored rows
                dlogits.scatter_add_(1, target, -valid.float())  # minus the one-hot target
                grad_hidden[start:start + rows] = dlogits @ weight
                grad_weight += dlogits.T @ h
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if with_grads else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None

def linear_cross_entropy(hidden, weight, labels):
    """(summed cross-entropy, number of predicted rows) of hidden (N, C) through the LM head weight
    (V, C) against labels (N,)."""
    with_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return LinearCrossEntropy.apply(hidden, weight, labels, with_grads), (labels != IGNORE).sum()

def predicted_rows(hidden, labels, ratio: float):
    """The masked positions of (B, T, C) hidden states in a fixed number of rows, so that shapes are
    static (torch.compile) and nothing waits on the host: ratio * N plus 10 standard deviations, the
    rows past the masked ones labelled IGNORE. More masked tokens than rows (odds below 1e-20) stop
    the run with a device-side assertion rather than drop any."""
    labels = labels.flatten()  # (N,)
    n = labels.numel()
    rows = min(n, math.ceil(ratio * n + 10 * math.sqrt(n * ratio * (1 - ratio))))
    masked = labels != IGNORE
    torch._assert_async(masked.sum() <= rows, "more masked tokens than predicted_rows holds")
    where = torch.nonzero_static(masked, size=rows, fill_value=0).squeeze(1)  # (rows,)
    kept = torch.arange(rows, device=labels.device) < masked.sum()
    return (hidden.flatten(0, 1).index_select(0, where),
            torch.where(kept, labels.index_select(0, where), IGNORE))

def pretraining_loss(model, tokens, objective: str, vocab: Vocab, *, mask_ratio: float = 0.4,
                     mask_replace: str = "mask", generator=None, draws=None,
                     sparse_head: bool = True):
    """The training loop's one entry point: (mean loss over predicted tokens, their number), the
    count a tensor so that no host sync is forced; the loop multiplies them back into a sum to
    average exactly over micro-batches and ranks. MLM's randomness comes from `generator`, or
    ready-drawn (mask_draws) under torch.compile; sparse_head=False runs the head on every position
    (bench.py measures what that costs)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    check_shape(tokens, min_length=2 if objective == "clm" else 1)
    if objective == "clm":
        # predict token t+1 from tokens 0..t; the last position has no next token
        labels = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], IGNORE)], dim=1)
        if vocab.pad_id is not None:
            labels = labels.masked_fill(labels == vocab.pad_id, IGNORE)
        hidden = model(tokens, causal=True)  # (B, T, C)
    else:
        inputs, labels = mask_tokens(tokens, vocab, mask_ratio, mask_replace, generator, draws)
        hidden = model(inputs, causal=False)  # (B, T, C)
    if objective == "mlm" and sparse_head:  # the head on the masked ~40% of the positions only
        hidden, labels = predicted_rows(hidden, labels, mask_ratio)
    loss_sum, n = linear_cross_entropy(hidden.flatten(0, -2), model.lm_head.weight,
                                       labels.flatten())
    return loss_sum / n.clamp(min=1), n

class PretrainingLoss(torch.nn.Module):
    """pretraining_loss as a module holding the model, so that torch.compile traces the model and
    its loss as one graph and DDP wraps both. It takes the MLM draws ready-made (mask_draws)."""

    def __init__(self, model, vocab: Vocab, mask_ratio: float, mask_replace: str,
                 sparse_head: bool):
        super().__init__()
        self.model, self.vocab = model, vocab
        self.mask_ratio, self.mask_replace, self.sparse_head = mask_ratio, mask_replace, sparse_head
        token_sets(vocab, model.lm_head.weight.device)  # built here, outside any compiled graph

    def forward(self, tokens, objective: str, draws=None):
        return pretraining_loss(self.model, tokens, objective, self.vocab, draws=draws,
                                mask_ratio=self.mask_ratio, mask_replace=self.mask_replace,
                                sparse_head=self.sparse_head)
