"""Both faces of the same weights: as an encoder the model fills in masked tokens, as a decoder it
continues a prompt; several checkpoints side by side, with both losses. docs/sample.md."""

import os
import re
import sys
from dataclasses import dataclass
from typing import NamedTuple

import torch

from mlm_vs_clm.checkpoints import load_model, source_problem
from mlm_vs_clm.parallel import device_problem
from mlm_vs_clm.settings import at_least, command, configure
from objectives import IGNORE, mask_tokens, pretraining_loss

LOSS_TEXT = ("Return the number of items that are not done yet, and raise ValueError if the queue "
             "is closed.")
SHOWS = ("fill", "continue", "loss")

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

    def checks(self):
        shows, specs = listed(self.show), listed(self.init_from)
        return [(shows and set(shows) <= set(SHOWS),
                 f"--show={self.show!r}: choose among {', '.join(SHOWS)}"),
                (0 <= self.mask_ratio < 1 and 0 <= self.loss_mask_ratio < 1,
                 "--mask_ratio and --loss_mask_ratio must be in [0, 1)"),
                *at_least(self, 1, "top_k"),
                *at_least(self, 0, "max_new_tokens", "sample_top_k", "temperature", "seed"),
                (specs, "--init_from: give a checkpoint, hf:DIR, or several, comma-separated"),
                *[(source_problem("init_from", spec) is None, source_problem("init_from", spec))
                  for spec in specs],
                (device_problem(self.device) is None, device_problem(self.device))]

def listed(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]

class Loaded(NamedTuple):
    label: str  # short name for the tables
    spec: str  # what --init_from said
    model: torch.nn.Module
    tok: object  # mlm_vs_clm.tokenizer.Tokenizer
    about: str

def label_of(spec: str) -> str:
    if spec.startswith("hf:"):  # out/run/hf -> hf:run/hf
        path = os.path.abspath(spec[3:])
        return f"hf:{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}"
    stem = os.path.splitext(os.path.basename(spec))[0]
    parent = os.path.basename(os.path.dirname(os.path.abspath(spec)))
    return parent if stem == "ckpt" else f"{parent}/{stem}"

def describe(ckpt: dict) -> str:
    if isinstance(ckpt.get("finetuned"), dict):
        return f"fine-tuned on {ckpt['finetuned'].get('task')} (its body; the head is not used)"
    about = [f"step {ckpt['step']}"] if ckpt.get("step") is not None else []
    if ckpt.get("objective"):
        about.append(f"last step trained {str(ckpt['objective']).upper()}")
    return ", ".join(about) or "a checkpoint"

def load(spec: str, device: str) -> Loaded:
    """A checkpoint (of a fine-tuned one, its body) or hf:DIR, with its tokenizer."""
    model, tok, ckpt = load_model(spec)
    about = describe(ckpt) if ckpt else "Hugging Face directory"
    about += f", {model.num_params()['paper'] / 1e6:.2f}M parameters"
    return Loaded(label_of(spec), spec, model.to(device).eval(), tok, about)

def same_vocabulary(a, b) -> bool:
    """Do the same ids mean the same tokens? An export may spell its name and pattern otherwise."""
    return (a.special_ids == b.special_ids and a.n_vocab == b.n_vocab
            and a.encoding._special_tokens == b.encoding._special_tokens
            and a.encoding._mergeable_ranks == b.encoding._mergeable_ranks)

def check_length(ids: list, block_size: int, what: str) -> None:
    if len(ids) > block_size:
        raise ValueError(f"{what} has {len(ids)} tokens, more than the model's context of "
                         f"{block_size} (block_size): shorten it")

def masked_text(tok, text: str, mask_ratio: float, seed: int):
    """(input ids, true token at each mask or IGNORE), both (T,): <|mask|> marks or --mask_ratio."""
    mask = tok.token_name(tok.mask_id)
    if mask_ratio > 0:
        if mask in text:
            raise ValueError(f"--text has {mask} marks and --mask_ratio={mask_ratio} is set: "
                             f"use one or the other")
        ids = torch.tensor([tok.encode(text)])
        generator = torch.Generator().manual_seed(seed)
        inputs, labels = mask_tokens(ids, tok.vocab(), mask_ratio, generator=generator)
        if not (labels != IGNORE).any():
            raise ValueError(f"--mask_ratio={mask_ratio} with --seed={seed} masked none of the "
                             f"{ids.size(1)} tokens of --text: use a longer text, another seed "
                             "or a higher ratio")
        return inputs[0], labels[0]
    pieces = re.split(r"\s*" + re.escape(mask), text)  # the space before a mask goes with it
    if len(pieces) == 1:
        raise ValueError(f"--text has no {mask}: mark each position to predict with {mask}, or "
                         "mask at random with --mask_ratio=0.4")
    ids = tok.encode(pieces[0])
    for piece in pieces[1:]:
        ids += [tok.mask_id] + tok.encode(piece)
    return torch.tensor(ids), torch.full((len(ids),), IGNORE)

@torch.no_grad()
def fill_mask(model, tok, inputs, top_k: int) -> list[list[tuple[int, float]]]:
    """At each mask, the top_k (token id, probability), bidirectional; the softmax skips padding."""
    check_length(inputs.tolist(), model.config.block_size, "--text")
    device = model.lm_head.weight.device
    hidden = model(inputs[None].to(device), causal=False)[0]  # (T, C)
    where = (inputs == tok.mask_id).nonzero().squeeze(1).to(device)
    probs = model.logits(hidden[where])[:, :tok.n_vocab].float().softmax(-1)  # (n_masks, vocab)
    best = probs.topk(min(top_k, tok.n_vocab), dim=-1)
    return [list(zip(i.tolist(), p.tolist())) for i, p in zip(best.indices, best.values)]

@torch.no_grad()
def continuation(model, tok, prompt_ids: list, cfg: SampleConfig) -> tuple[list, str]:
    """(New ids after the prompt under causal attention, why it stopped); never past the context."""
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
        logits[[tok.mask_id, tok.pad_id]] = float("-inf")  # no causal model is trained on them
        if cfg.temperature == 0:
            token = int(logits.argmax())
        else:
            # from the top logit down: no temperature, however small, overflows
            logits = (logits - logits.max()) / cfg.temperature
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
    """(CLM loss, MLM loss, masked tokens) on one text; every model gets the same seeded masks."""
    check_length(ids, model.config.block_size, "the loss text")
    if len(ids) < 2:
        raise ValueError("the loss text needs at least 2 tokens (CLM predicts the next one)")
    tokens = torch.tensor([ids], device=model.lm_head.weight.device)
    clm, _ = pretraining_loss(model, tokens, "clm", tok.vocab())
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same masks on any device
    mlm, n = pretraining_loss(model, tokens, "mlm", tok.vocab(), mask_ratio=mask_ratio,
                              generator=generator)
    if int(n) == 0:
        raise ValueError(f"the MLM loss masked none of the {len(ids)} tokens of the loss text at "
                         f"ratio {mask_ratio} with seed {seed}: use a longer text or another seed")
    return float(clm), float(mlm), int(n)

def shown(tok, token_id: int) -> str:
    return repr(tok.decode([token_id]))

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
        continued[m.label], why = continuation(m.model, tok, prompt_ids, cfg)
        print(f"    {m.label:<{width}}{tok.decode(prompt_ids + continued[m.label])!r}  [{why}]")
    return continued

def print_losses(models: list[Loaded], width: int, cfg: SampleConfig) -> dict:
    tok, scores = models[0].tok, {}
    text = cfg.loss_text or cfg.text
    if tok.token_name(tok.mask_id) in text:
        raise ValueError(f"the loss text {text!r} has {tok.token_name(tok.mask_id)} marks: the "
                         "losses need a plain text (give --loss_text, or --text with --mask_ratio)")
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

@command
def main(argv: list[str]) -> dict:
    cfg = configure(SampleConfig, argv)
    models = [load(spec, cfg.device) for spec in listed(cfg.init_from)]
    for other in models[1:]:
        if not same_vocabulary(models[0].tok, other.tok):
            raise ValueError(f"{models[0].spec} uses the tokenizer {models[0].tok.name} and "
                             f"{other.spec} uses {other.tok.name}: one tokenizer per comparison")
    if len({m.label for m in models}) < len(models):  # two runs' step checkpoints, say
        models = [m._replace(label=m.spec) for m in models]
    width = max(len(m.label) for m in models) + 2
    for m in models:
        print(f"{m.label}: {m.spec} ({m.about})")
    parts = {"fill": print_fill, "continue": print_continuations, "loss": print_losses}
    return {name: parts[name](models, width, cfg) for name in SHOWS if name in listed(cfg.show)}

if __name__ == "__main__":
    main(sys.argv[1:])
