"""
Both faces of the same weights (nanoGPT's sample.py, for this project). As an encoder the model
fills in masked tokens with bidirectional attention; as a decoder it continues a prompt with causal
attention; several checkpoints side by side show what each pretraining made of them, with the loss
each gets on one text under both objectives (the same masks for every model).

    python sample.py --init_from=out/demo/ckpt.pt                 # fill-mask, continuation, losses
    python sample.py --init_from=out/demo/ckpt.pt --show=fill --text="Raise a <|mask|> error."
    python sample.py --init_from=out/demo/ckpt.pt --text="Return the number of items." \
        --mask_ratio=0.4 --seed=1 --loss_text=               # mask at random as MLM does
    python sample.py --init_from=out/demo/ckpt.pt --show=continue --prompt="Return the" \
        --temperature=0.8 --sample_top_k=50 --seed=3          # sample instead of greedy
    python sample.py --init_from=out/exp/clm/ckpt.pt,out/exp/mlm/ckpt.pt,out/exp/clm25-mlm/ckpt.pt
    python sample.py --init_from=hf:out/demo/hf               # an exported (or any hf:) directory

The comparison of three 400-step runs of the CPU experiment (`--top_k=3 --max_new_tokens=12`):

    clm: out/exp/clm/ckpt.pt (step 400, last step trained CLM, 1.90M parameters)
    ...
    fill-mask, bidirectional attention: 'If<|mask|> is None, the default<|mask|> is used.'
      mask 1, after 'If':
        clm        ',' 7.9%  'ed' 6.3%  's' 6.2%
        mlm        ' the' 5.6%  '\n' 4.2%  ' is' 3.5%
        clm25-mlm  '.' 10.8%  ' `' 9.0%  '\n' 8.0%
      mask 2, after '<|mask|> is None, the default':
        ...
    continuation, causal attention, greedy: 'Return the number of'
        clm        'Return the number of the\n    ``torch.nn``'  [max_new_tokens=12]
        mlm        'Return the number of\n` the\n` the\n` the\n` the'  [max_new_tokens=12]
        clm25-mlm  'Return the number ofssssssssssss'  [max_new_tokens=12]

    losses on 'Return the number of items that are not done yet, and raise ValueError if the
    queue is closed.' (21 tokens; MLM: 40% masked with seed 0, the same masks for every model)
                     clm loss  mlm loss
        clm            5.1326    7.5467
        mlm            7.1350    7.6922
        clm25-mlm      6.9795    7.7159

The mask token is the tokenizer's own (<|mask|> for ours), and the spaces before it go with it, as
in the exported tokenizer.json (lstrip): a masked token carries its own leading space. With
--mask_ratio the truth is shown at each mask, and with --loss_text= the MLM loss is computed on
exactly the masks shown (the same ratio and seed).
"""

import os
import re
import sys
from dataclasses import dataclass
from typing import NamedTuple

import torch

from checkpoints import model_from_checkpoint, read_checkpoint
from data import get_tokenizer
from hf import checkpoint_tokenizer, load_hf
from objectives import IGNORE, Vocab, mask_tokens, pretraining_loss
from settings import configure


LOSS_TEXT = ("Return the number of items that are not done yet, and raise ValueError if the queue "
             "is closed.")


@dataclass
class SampleConfig:
    init_from: str = "out/demo/ckpt.pt"  # a checkpoint, hf:DIR, or several, comma-separated
    show: str = "fill,continue,loss"  # what to print, comma-separated: fill, continue, loss
    text: str = "If <|mask|> is None, the default <|mask|> is used."  # fill-mask: <|mask|> marks
    mask_ratio: float = 0.0  # > 0: mask this share of --text's tokens at random, as MLM pretraining
    top_k: int = 5  # fill-mask: the most likely tokens shown at each masked position
    prompt: str = "Return the number of"  # continuation: the text continued with causal attention
    max_new_tokens: int = 30  # continuation: at most this many new tokens (stops at end-of-text)
    temperature: float = 0.0  # continuation: 0 is greedy; > 0 samples from softmax(logits / T)
    sample_top_k: int = 50  # continuation with temperature > 0: sample among the k likeliest; 0 all
    loss_text: str = LOSS_TEXT  # the text both losses are measured on; "": --text (no marks)
    loss_mask_ratio: float = 0.0  # MLM loss: share masked; 0: --mask_ratio if set, else 0.4
    seed: int = 0  # the random masks (--mask_ratio and the MLM loss) and the sampling
    device: str = "cpu"  # torch device: cpu, cuda, mps


SHOWS = ("fill", "continue", "loss")


class Loaded(NamedTuple):
    label: str  # short name for the tables
    spec: str  # what --init_from said
    model: torch.nn.Module
    tok: object  # data.Tokenizer
    about: str


def label_of(spec: str) -> str:
    if spec.startswith("hf:"):  # out/run/hf -> hf:run/hf
        path = os.path.abspath(spec[3:])
        return f"hf:{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}"
    stem = os.path.splitext(os.path.basename(spec))[0]
    parent = os.path.basename(os.path.dirname(os.path.abspath(spec)))
    return parent if stem == "ckpt" else f"{parent}/{stem}"


def describe(ckpt: dict) -> str:
    finetuned = ckpt.get("finetuned")
    if isinstance(finetuned, dict):
        return f"fine-tuned on {finetuned.get('task')} (its body; the head is not used)"
    about = [f"step {ckpt['step']}"] if ckpt.get("step") is not None else []
    if ckpt.get("objective"):
        about.append(f"last step trained {str(ckpt['objective']).upper()}")
    return ", ".join(about) or "a checkpoint"


def load(spec: str, device: str) -> Loaded:
    """One of our checkpoints (pretrained, step-tagged or fine-tuned: its body) or hf:DIR, with the
    tokenizer it was trained with."""
    if os.path.isdir(spec):
        raise ValueError(f"{spec} is a directory: write hf:{spec} for a Hugging Face checkpoint "
                         "directory, or give a checkpoint file (out_dir/ckpt.pt)")
    if spec.startswith("hf:"):
        tok = get_tokenizer(spec)
        model, about = load_hf(spec[3:], tok), "Hugging Face directory"
    else:
        ckpt = read_checkpoint(spec)
        model, tok = model_from_checkpoint(ckpt, spec), checkpoint_tokenizer(ckpt, spec)
        about = describe(ckpt)
    if model.config.vocab_size != tok.n_vocab:
        raise ValueError(f"{spec}: the model has {model.config.vocab_size} token ids and its "
                         f"tokenizer {tok.name} {tok.n_vocab}: they do not belong together")
    n = model.num_params()["paper"] / 1e6
    return Loaded(label_of(spec), spec, model.to(device).eval(), tok,
                  f"{about}, {n:.2f}M parameters")


def same_vocabulary(a, b) -> bool:
    """Do the same ids mean the same tokens (an exported tokenizer.json and its original may differ
    in name and in how the pattern is spelled, not in that)?"""
    return (a.special_ids == b.special_ids and a.n_vocab == b.n_vocab
            and a.encoding._special_tokens == b.encoding._special_tokens
            and a.encoding._mergeable_ranks == b.encoding._mergeable_ranks)


def vocab_of(tok) -> Vocab:
    return Vocab(size=tok.n_vocab, mask_id=tok.mask_id, special_ids=tok.special_ids,
                 pad_id=tok.pad_id)


def mask_name(tok) -> str:
    return tok.encoding.decode_single_token_bytes(tok.mask_id).decode()


def check_length(ids: list, block_size: int, what: str) -> None:
    if len(ids) > block_size:
        raise ValueError(f"{what} has {len(ids)} tokens, more than the model's context of "
                         f"{block_size} (block_size): shorten it")


def masked_text(tok, text: str, mask_ratio: float, seed: int):
    """(input ids, the true token at each masked position or IGNORE), both (T,): the tokenizer's
    mask token marks the positions, or --mask_ratio masks at random exactly as MLM pretraining
    does (objectives.mask_tokens, seeded)."""
    mask = mask_name(tok)
    if mask_ratio > 0:
        if mask in text:
            raise ValueError(f"--text has {mask} marks and --mask_ratio={mask_ratio} is set: "
                             f"use one or the other")
        ids = torch.tensor([tok.encode(text)])
        generator = torch.Generator().manual_seed(seed)
        inputs, labels = mask_tokens(ids, vocab_of(tok), mask_ratio, generator=generator)
        if not (labels != IGNORE).any():
            raise ValueError(f"--mask_ratio={mask_ratio} with --seed={seed} masked none of the "
                             f"{ids.size(1)} tokens of --text: use a longer text, another seed "
                             "or a higher ratio")
        return inputs[0], labels[0]
    pieces = re.split(r"\s*" + re.escape(mask), text)  # the space before a mask goes with it
    if len(pieces) == 1:
        raise ValueError(f"--text has no {mask}: mark each position to predict with {mask} "
                         "(e.g. --text=\"The value of <|mask|> is returned.\"), or mask at "
                         "random with --mask_ratio=0.4")
    ids = tok.encode(pieces[0])
    for piece in pieces[1:]:
        ids += [tok.mask_id] + tok.encode(piece)
    return torch.tensor(ids), torch.full((len(ids),), IGNORE)


@torch.no_grad()
def fill_mask(model, tok, inputs, top_k: int) -> list[list[tuple[int, float]]]:
    """At each mask, in order: the top_k (token id, probability), with bidirectional attention. The
    softmax is over the tokenizer's ids (the padding rows past them are no tokens), as
    transformers' fill-mask pipeline computes it over an exported model's vocabulary."""
    check_length(inputs.tolist(), model.config.block_size, "--text")
    device = model.lm_head.weight.device
    hidden = model(inputs[None].to(device), causal=False)[0]  # (T, C)
    where = (inputs == tok.mask_id).nonzero().squeeze(1).to(device)
    probs = model.logits(hidden[where])[:, :tok.n_vocab].float().softmax(-1)  # (n_masks, vocab)
    best = probs.topk(min(top_k, tok.n_vocab), dim=-1)
    return [list(zip(i.tolist(), p.tolist())) for i, p in zip(best.indices, best.values)]


@torch.no_grad()
def continuation(model, tok, prompt_ids: list, cfg: SampleConfig) -> tuple[list, str]:
    """New token ids after the prompt with causal attention, and why it stopped. Greedy at
    temperature 0, else sampled (seeded; among the sample_top_k likeliest). Never <|mask|> or
    <|pad|>, which no causal model is trained to predict; never past the context."""
    block = model.config.block_size
    if len(prompt_ids) >= block:
        raise ValueError(f"--prompt has {len(prompt_ids)} tokens, which leaves no room in the "
                         f"model's context of {block} (block_size): shorten it")
    device = model.lm_head.weight.device
    # an empty prompt starts where a document starts in pretraining: after an end-of-text token
    ids, new = list(prompt_ids) or [tok.eot_id], []
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    while len(new) < cfg.max_new_tokens:
        if len(ids) >= block:
            return new, f"the context of {block} tokens is full"
        hidden = model(torch.tensor([ids], device=device), causal=True)[0, -1]
        logits = model.logits(hidden)[:tok.n_vocab].float()
        logits[[tok.mask_id, tok.pad_id]] = float("-inf")
        if cfg.temperature == 0:
            token = int(logits.argmax())
        else:
            logits = logits / cfg.temperature
            if 0 < cfg.sample_top_k < logits.numel():
                kth = logits.topk(cfg.sample_top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        if token == tok.eot_id:
            return new, "end-of-text"
        ids.append(token)
        new.append(token)
    return new, f"max_new_tokens={cfg.max_new_tokens}"


@torch.no_grad()
def losses(model, tok, ids: list, mask_ratio: float, seed: int) -> tuple[float, float, int]:
    """(CLM loss, MLM loss, tokens MLM predicted) on one text, computed as in pretraining
    (objectives.pretraining_loss); the MLM masks come from a generator seeded with `seed`, so every
    model is scored on the same masked positions."""
    check_length(ids, model.config.block_size, "the loss text")
    if len(ids) < 2:
        raise ValueError("the loss text needs at least 2 tokens (CLM predicts the next one)")
    tokens = torch.tensor([ids], device=model.lm_head.weight.device)
    clm, _ = pretraining_loss(model, tokens, "clm", vocab_of(tok))
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same masks on any device
    mlm, n = pretraining_loss(model, tokens, "mlm", vocab_of(tok), mask_ratio=mask_ratio,
                              generator=generator)
    if int(n) == 0:
        raise ValueError(f"the MLM loss masked none of the {len(ids)} tokens of the loss text at "
                         f"ratio {mask_ratio} with seed {seed}: use a longer text or another seed")
    return float(clm), float(mlm), int(n)


def shown(tok, token_id: int) -> str:
    return repr(tok.decode([token_id]))


def validate(cfg: SampleConfig) -> list[str]:
    show = [s.strip() for s in cfg.show.split(",") if s.strip()]
    problems = [f"--show: unknown {s!r} (choose among {', '.join(SHOWS)})"
                for s in show if s not in SHOWS]
    if not show:
        problems.append(f"--show is empty (choose among {', '.join(SHOWS)})")
    if not 0 <= cfg.mask_ratio < 1 or not 0 <= cfg.loss_mask_ratio < 1:
        problems.append("--mask_ratio and --loss_mask_ratio must be in [0, 1)")
    if cfg.top_k < 1 or cfg.max_new_tokens < 0 or cfg.sample_top_k < 0 or cfg.temperature < 0:
        problems.append("--top_k >= 1, --max_new_tokens >= 0, --sample_top_k >= 0 and "
                        "--temperature >= 0")
    if not [s for s in cfg.init_from.split(",") if s.strip()]:
        problems.append("--init_from: give a checkpoint, hf:DIR, or several, comma-separated")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))
    return show


def print_fill(models: list[Loaded], width: int, cfg: SampleConfig) -> dict:
    tok = models[0].tok
    inputs, truth = masked_text(tok, cfg.text, cfg.mask_ratio, cfg.seed)
    print(f"\nfill-mask, bidirectional attention: {tok.decode(inputs)!r}")
    predictions = {m.label: fill_mask(m.model, tok, inputs, cfg.top_k) for m in models}
    for k, pos in enumerate((inputs == tok.mask_id).nonzero().squeeze(1).tolist()):
        known = f", truth {shown(tok, int(truth[pos]))}" if truth[pos] != IGNORE else ""
        print(f"  mask {k + 1}, after {tok.decode(inputs[max(0, pos - 6):pos])!r}{known}:")
        for m in models:
            print(f"    {m.label:<{width}}" + "  ".join(
                f"{shown(tok, i)} {100 * p:.1f}%" for i, p in predictions[m.label][k]))
    return predictions


def print_continuations(models: list[Loaded], width: int, cfg: SampleConfig) -> dict:
    tok, continued = models[0].tok, {}
    prompt_ids = tok.encode(cfg.prompt)
    how = "greedy" if cfg.temperature == 0 else \
        f"sampled at temperature {cfg.temperature}, top {cfg.sample_top_k or 'all'}"
    print(f"\ncontinuation, causal attention, {how}: {cfg.prompt!r}")
    for m in models:
        new, why = continuation(m.model, tok, prompt_ids, cfg)
        print(f"    {m.label:<{width}}{tok.decode(prompt_ids + new)!r}  [{why}]")
        continued[m.label] = new
    return continued


def print_losses(models: list[Loaded], width: int, cfg: SampleConfig) -> dict:
    tok, scores = models[0].tok, {}
    text = cfg.loss_text or cfg.text
    if mask_name(tok) in text:
        raise ValueError(f"the loss text {text!r} has {mask_name(tok)} marks: the losses need a "
                         "plain text (give --loss_text, or --text with --mask_ratio)")
    ratio = cfg.loss_mask_ratio or cfg.mask_ratio or 0.4
    ids = tok.encode(text)
    print(f"\nlosses on {text!r} ({len(ids)} tokens; MLM: {ratio:.0%} masked with seed "
          f"{cfg.seed}, the same masks for every model)")
    print(f"    {'':<{width}}{'clm loss':>10}{'mlm loss':>10}")
    for m in models:
        clm, mlm, _ = losses(m.model, tok, ids, ratio, cfg.seed)
        print(f"    {m.label:<{width}}{clm:>10.4f}{mlm:>10.4f}")
        scores[m.label] = (clm, mlm)
    return scores


def run(cfg: SampleConfig, show: list[str]) -> dict:
    models = [load(spec.strip(), cfg.device) for spec in cfg.init_from.split(",") if spec.strip()]
    for other in models[1:]:
        if not same_vocabulary(models[0].tok, other.tok):
            raise ValueError(f"{models[0].spec} uses the tokenizer {models[0].tok.name} and "
                             f"{other.spec} uses {other.tok.name}: the same text would be other "
                             "token ids; compare checkpoints trained with the same tokenizer")
    if len({m.label for m in models}) < len(models):  # two runs' step checkpoints, say
        models = [m._replace(label=m.spec) for m in models]
    width = max(len(m.label) for m in models) + 2
    for m in models:
        print(f"{m.label}: {m.spec} ({m.about})")
    parts = {"fill": print_fill, "continue": print_continuations, "loss": print_losses}
    return {name: parts[name](models, width, cfg) for name in SHOWS if name in show}


def main(argv: list[str]) -> dict:
    cfg = configure(SampleConfig, argv)
    show = validate(cfg)
    try:
        return run(cfg, show)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
