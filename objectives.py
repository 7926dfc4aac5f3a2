"""The two pretraining objectives the paper compares, and when each runs: the only file that masks
tokens or computes a pretraining loss. CLM predicts every next token, attention looking left
only; MLM hides a random `mask_ratio` of the tokens and predicts them from both sides.

    loss, n_predicted = pretraining_loss(model, tokens, "mlm", vocab, generator=g)

`tokens` is a (B, T) batch of packed token blocks, as data.py's loader yields them.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

OBJECTIVES = ("clm", "mlm")
MASK_REPLACE = ("mask", "bert")
IGNORE = -100  # label of a position that is not predicted (F.cross_entropy's default ignore_index)


@dataclass(frozen=True)
class Vocab:
    """What the objectives need to know about the tokenizer."""
    size: int  # number of token ids the tokenizer produces (ids 0 .. size-1)
    mask_id: int  # <|mask|>
    special_ids: tuple  # never masked, never a random replacement, never a CLM target if pad
    # padding, ignored as a target (pretraining blocks are packed and have none)
    pad_id: int | None = None


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


def mask_tokens(tokens, vocab: Vocab, mask_ratio: float = 0.4, mask_replace: str = "mask",
                generator=None):
    """The MLM corruption. Each non-special token is selected independently with probability
    mask_ratio (the paper's default 0.4; BERT used 0.15). A selected token is replaced by <|mask|>
    ("mask", the rule of the paper's code), or, BERT's rule ("bert"), by <|mask|> 80% of the time, a
    random ordinary token 10%, and left unchanged 10%. Returns (inputs, labels), both (B, T): labels
    hold the original token at selected positions and IGNORE everywhere else, so the loss is over
    the selected positions only."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    if mask_replace not in MASK_REPLACE:
        raise ValueError(f"mask_replace must be one of {MASK_REPLACE}, got {mask_replace!r}")
    device = tokens.device

    # drawn on the generator's device so that a seed gives the same batch on any device
    def uniform(shape):
        return torch.rand(shape, generator=generator,
                          device=generator.device if generator else device).to(device)

    is_special = torch.isin(tokens, torch.tensor(vocab.special_ids, device=device))
    selected = (uniform(tokens.shape) < mask_ratio) & ~is_special  # (B, T) bool
    labels = torch.where(selected, tokens, IGNORE)
    inputs = tokens.masked_fill(selected, vocab.mask_id)
    if mask_replace == "bert":
        roll = uniform(tokens.shape)  # one draw decides between the three outcomes
        to_random = selected & (roll >= 0.8) & (roll < 0.9)
        keep = selected & (roll >= 0.9)
        ordinary = torch.ones(vocab.size, dtype=torch.bool, device=device)
        ordinary[list(vocab.special_ids)] = False
        ordinary_ids = ordinary.nonzero().squeeze(1)  # (n_ordinary,)
        pick = (uniform(tokens.shape) * len(ordinary_ids)).long().clamp_(max=len(ordinary_ids) - 1)
        inputs = torch.where(to_random, ordinary_ids[pick], inputs)
        inputs = torch.where(keep, tokens, inputs)
    return inputs, labels


def cross_entropy(model, hidden, labels, sparse: bool):
    """Mean cross-entropy over the positions whose label is not IGNORE; returns (loss, number of
    predictions). sparse=True runs the LM head on the predicted positions only: with 40% masking
    that skips 60% of the largest matmul of the step (the vocabulary projection) and of its
    (B, T, vocab) logits, for the same result. CLM predicts every position, where gathering them
    first would only add a copy."""
    head = getattr(model, "module", model).logits  # the LM head, also when model is wrapped in DDP
    keep = labels != IGNORE  # (B, T)
    n = keep.sum()
    if not sparse:
        logits = head(hidden)  # (B, T, vocab)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                               ignore_index=IGNORE), n
    logits = head(hidden[keep])  # (N, vocab)
    # nothing selected (a tiny batch at a low ratio): a zero loss that still has a graph
    if logits.size(0) == 0:
        return hidden.sum() * 0.0, n
    return F.cross_entropy(logits.float(), labels[keep]), n


def pretraining_loss(model, tokens, objective: str, vocab: Vocab, *, mask_ratio: float = 0.4,
                     mask_replace: str = "mask", generator=None, sparse_head: bool = True):
    """The one entry point of the training loop. Returns (mean loss over predicted tokens, number of
    predicted tokens), the count as a tensor so that no host sync is forced: the loop multiplies the
    two back into a sum to average exactly over micro-batches and ranks that predict different
    numbers of tokens. sparse_head=False runs MLM's LM head on every position, only to measure what
    the sparse head saves (bench.py)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "clm":
        check_shape(tokens, min_length=2)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]  # predict token t+1 from tokens 0..t
        if vocab.pad_id is not None:
            labels = labels.masked_fill(labels == vocab.pad_id, IGNORE)
        hidden = model(inputs, causal=True)  # (B, T-1, C)
    else:
        check_shape(tokens, min_length=1)
        inputs, labels = mask_tokens(tokens, vocab, mask_ratio, mask_replace, generator)
        hidden = model(inputs, causal=False)  # (B, T, C)
    return cross_entropy(model, hidden, labels, sparse=objective == "mlm" and sparse_head)
