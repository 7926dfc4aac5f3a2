"""
Pretrain the model with CLM, MLM, or one then the other, at a fixed step budget.

  python train.py                                   # CPU demo: CLM then MLM on the docstring corpus
  python train.py --objective=mlm --switch_to=none  # pure MLM
  python train.py config/610m.py --switch_at=0.25   # a paper preset (see config/)
  torchrun --nproc_per_node=8 train.py config/610m.py --objective=clm --switch_to=mlm
  python train.py --init_from=out/clm/ckpt.pt --objective=mlm --switch_to=none --out_dir=out/cpt
  python train.py --help                            # every setting, its default and meaning

The fifth continues the pretraining (CPT) of another run's weights (start.py). Settings: the
defaults below < config files (Python) < --key=value (settings.py). The objective switch is the
paper's: at `switch_at` the weights and the optimizer state carry over, attention becomes
bidirectional (or causal, for MLM -> CLM) and the learning rate continues on the same schedule,
without a new warmup; the only decay is at the end of the whole budget.
"""

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import files
import parallel
from data import (BlockLoader)
from device import peak_flops
from hf import export_hf
from checkpoints import (checkpoint_payload, kept_steps, last_good, open_log, read_checkpoint,
                         save_checkpoint)
from model import Transformer, configure_optimizer
from objectives import MASK_REPLACE, OBJECTIVES, Vocab, pretraining_loss
from settings import configure
from start import Data, build_model, check_unique_data, open_data
from tracker import Tracker


@dataclass
class TrainConfig:
    # data
    data: str = "docstrings"  # docstrings (offline), fineweb-edu[:config], or .txt/.jsonl path/glob
    data_dir: str = ""  # prepared token files; "" = data/<data>_<tokenizer>, prepared on first use
    data_tokens: int = 0  # token budget when preparing a streamed source (fineweb-edu); 0 = all
    repeat_data: bool = False  # allow reading training blocks twice; the paper's data never repeats
    tokenizer: str = "cl100k_8k"  # "cl100k" (paper-like) or "cl100k_<N>k" (its first N*1024 merges)
    # model
    model: str = "tiny"  # preset in model.py: test, tiny, 210m, 610m, 1b
    block_size: int = 128  # tokens per sequence (the paper: 2048)
    attention: str = "sdpa"  # sdpa or manual (explicit scores, mask, softmax; slower, same result)
    # objective
    objective: str = "clm"  # objective of the first phase: clm or mlm
    switch_to: str = "mlm"  # objective after the switch: mlm, clm, or none (single-objective run)
    switch_at: float = 0.25  # fraction of max_steps if < 1 (the paper's 0.25/0.5/0.75), else a step
    mask_ratio: float = 0.4  # MLM: probability that a token is masked (the paper's default)
    mask_replace: str = "mask"  # MLM: "mask" (all -> <|mask|>, paper's code) or "bert" (80/10/10)
    sparse_head: bool = True  # MLM: run the LM head on masked positions only (same loss, less work)
    # optimisation
    max_steps: int = 200  # optimizer steps in the whole budget, both phases together
    batch_size: int = 8  # sequences per micro-batch on each process
    total_batch_size: int = 0  # sequences per step over all processes; 0 = one micro-batch each
    lr: float = 2e-3  # peak learning rate (the paper: 5e-4 at its batch size)
    warmup_steps: int = 20  # linear warmup from 0 (the paper: 2000)
    decay_steps: int = 40  # linear decay to 0 at the end of the budget (the paper: 2000)
    weight_decay: float = 0.1  # AdamW, matrices only
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95  # AdamW
    adam_eps: float = 1e-5  # AdamW
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    # evaluation, logging, checkpoints
    eval_interval: int = 25  # steps between validation (both objectives) and checkpoint; 0 = at end
    eval_batches: int = 4  # micro-batches per validation loss
    out_dir: str = "out/demo"  # checkpoint ckpt.pt, log.jsonl and summary.json go here
    init_from: str = "scratch"  # scratch, resume, a checkpoint, or hf:DIR (HF Llama or EuroBERT)
    stop_at: int = 0  # stop after this step with a checkpoint, to resume later; 0 = run to the end
    keep_checkpoints: str = ""  # also keep the weights at steps "1000,5000" or "every:1000"
    load_optimizer: bool = True  # init_from=CKPT: start from its AdamW state (start.py), else empty
    # system
    device: str = "auto"  # "auto" (cuda, then mps, then cpu), or a torch device string
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on CUDA, else float32), bfloat16, float32
    compile: str = "auto"  # torch.compile the model: "auto" (on CUDA), "true", "false"
    seed: int = 0  # model init, data order and masking all derive from it
    progress: bool = True  # tqdm progress bar
    wandb_project: str = ""  # also log to Weights & Biases in this project (tracker.py); "" = off
    wandb_run: str = ""  # the W&B run name; "" = the out_dir's name
    fsdp: bool = False  # FSDP2: shard parameters, gradients and AdamW state instead of DDP's copies
    export: str = ""  # "hf": write out_dir/ckpt.pt as an HF directory out_dir/hf (hf.py), then exit


def validate(cfg: TrainConfig):
    checks = [
        (cfg.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}"),
        (cfg.switch_to in OBJECTIVES + ("none",),
         f"switch_to must be one of {OBJECTIVES + ('none',)}"),
        (cfg.switch_to != cfg.objective,
         "switch_to equals objective; use --switch_to=none for a single objective"),
        (0 < cfg.switch_at < cfg.max_steps,
         "switch_at must be a fraction in (0, 1) or a step in [1, max_steps)"),
        (0 < cfg.mask_ratio < 1, "mask_ratio must be in (0, 1)"),
        (cfg.mask_replace in MASK_REPLACE, f"mask_replace must be one of {MASK_REPLACE}"),
        (cfg.max_steps > 0 and cfg.batch_size > 0 and cfg.block_size > 1,
         "max_steps, batch_size, block_size > 0"),
        (cfg.warmup_steps + cfg.decay_steps <= cfg.max_steps,
         "warmup_steps + decay_steps must fit in max_steps"),
        (cfg.lr > 0, "lr must be positive"),
        (cfg.grad_clip >= 0,
         "grad_clip must be >= 0 (0 = off; a negative bound would turn clipping into ascent)"),
        (cfg.dtype in ("auto", "bfloat16", "float32"), "dtype must be auto, bfloat16 or float32"),
        (cfg.compile in ("auto", "true", "false"), "compile must be auto, true or false"),
        (cfg.stop_at >= 0 and cfg.eval_interval >= 0, "stop_at and eval_interval must be >= 0"),
        (cfg.eval_batches > 0, "eval_batches must be >= 1"),
    ]
    problems = [message for ok, message in checks if not ok]
    try:
        kept_steps(cfg.keep_checkpoints, cfg.max_steps)
    except ValueError as e:
        problems.append(str(e))
    switch = switch_step(cfg) if not problems and cfg.switch_to != "none" else None
    if switch is not None and not 0 < switch < cfg.max_steps:
        problems.append(f"switch_at={cfg.switch_at:g} puts the switch at step {switch} of "
                        f"{cfg.max_steps}, which leaves one phase empty: choose a switch inside "
                        "the run, or --switch_to=none")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------------
# The schedule and the objective switch


def switch_step(cfg: TrainConfig):
    """The first step of the second phase, or None for a single-objective run."""
    if cfg.switch_to == "none":
        return None
    return round(cfg.switch_at * cfg.max_steps) if cfg.switch_at < 1 else int(cfg.switch_at)


def objective_at(step: int, cfg: TrainConfig) -> str:
    switch = switch_step(cfg)
    return cfg.objective if switch is None or step < switch else cfg.switch_to


def lr_at(step: int, peak: float, max_steps: int, warmup_steps: int, decay_steps: int) -> float:
    """Warmup-stable-decay, the paper's schedule: linear warmup from 0, constant, then linear decay
    reaching 0 right after the last step. It spans the whole budget, so the objective switch does
    not touch it. Fine-tuning's schedule (10% warmup, then linear decay to 0) is the same function
    with decay_steps = max_steps - warmup_steps."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_start = max_steps - decay_steps
    if step >= decay_start:
        return peak * (max_steps - step) / decay_steps
    return peak


def lr_of(step: int, cfg: TrainConfig) -> float:
    return lr_at(step, cfg.lr, cfg.max_steps, cfg.warmup_steps, cfg.decay_steps)


# --------------------------------------------------------------------------------------------------
# One optimizer step, shared with bench.py


def reseed(generator: torch.Generator, *keys: int) -> torch.Generator:
    """Masking randomness is a pure function of (seed, step, which micro-batch of the step): a
    resumed run masks exactly as an uninterrupted one, with no generator state to save, and 2
    processes of 1 micro-batch mask exactly as 1 process of 2."""
    return generator.manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


def train_step(model, optimizer, next_batch, cfg: TrainConfig, vocab: Vocab, step: int,
               grad_accum: int, generator: torch.Generator, autocast=nullcontext, rank: int = 0,
               world_size: int = 1):
    """Forward and backward over grad_accum micro-batches, then one AdamW step. Returns (mean loss,
    grad norm) as tensors. The loss is averaged exactly over every predicted token of every
    micro-batch on every process: MLM predicts a different number of tokens each time, so averaging
    per-micro-batch means would weigh them wrongly."""
    objective = objective_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr_of(step, cfg)
    loss_sum = n_sum = 0
    for micro in range(grad_accum):
        tokens = next_batch()
        last = micro == grad_accum - 1
        # Under DDP, gradients are all-reduced only on the last micro-step; the others accumulate
        # locally. FSDP2 keeps them unsharded until the last micro-step, then reduce-scatters once.
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(last)
        with (model.no_sync() if isinstance(model, DDP) and not last
              else nullcontext()), autocast():
            loss, n = pretraining_loss(model, tokens, objective, vocab, mask_ratio=cfg.mask_ratio,
                                       mask_replace=cfg.mask_replace, sparse_head=cfg.sparse_head,
                                       generator=reseed(generator, cfg.seed, step,
                                                        micro * world_size + rank))
        # the sum over predicted tokens; normalised below once the global count is known
        (loss * n).backward()
        loss_sum, n_sum = loss_sum + loss.detach() * n, n_sum + n
    totals = torch.stack([loss_sum, n_sum.to(loss_sum.dtype)])
    if world_size > 1:
        dist.all_reduce(totals)
    mean_loss, n_total = totals[0] / totals[1], totals[1]
    # DDP averaged the gradient sums over processes;
    # turn that into the mean over every predicted token.
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    torch._foreach_mul_(grads, world_size / n_total)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
    # FSDP: a DTensor
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    # The one host sync of the step: a non-finite loss or gradient never reaches the weights. A
    # finite loss can come with an infinite gradient (a huge learning rate overflows the
    # backward pass first).
    if not torch.isfinite(torch.stack([mean_loss, grad_norm.to(mean_loss.dtype)])).all():
        raise FloatingPointError(f"step {step + 1} ({objective}) has loss "
                                 f"{mean_loss.item():.4g} and gradient norm "
                                 f"{grad_norm.item():.4g}; its update was not applied")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return mean_loss, grad_norm


@torch.no_grad()
def evaluate(model, cfg: TrainConfig, vocab: Vocab, data_dir: str, generator, device,
             autocast=nullcontext, rank: int = 0, world_size: int = 1) -> dict:
    """Validation loss under BOTH objectives, whatever the current one, so the transfer at the
    switch shows. Every evaluation reads the same first blocks of the validation split and masks
    them the same way; all processes take part and their sums are reduced, so the figure is the loss
    over all predicted tokens."""
    losses = {}
    for objective in OBJECTIVES:
        loader = BlockLoader(data_dir, "val", cfg.block_size, cfg.batch_size, seed=0, rank=rank,
                             world_size=world_size, device=device)
        totals = torch.zeros(2, device=device)
        # Global micro-batch g = k * world_size + rank covers
        # the same blocks whatever the number of processes.
        for k in range(math.ceil(cfg.eval_batches / world_size)):
            tokens, g = loader.next_batch(), k * world_size + rank
            if g < cfg.eval_batches:
                with autocast():
                    loss, n = pretraining_loss(model, tokens, objective, vocab,
                                               mask_ratio=cfg.mask_ratio,
                                               mask_replace=cfg.mask_replace,
                                               generator=reseed(generator, 1, g))
                totals += torch.stack([loss.float() * n, n.float()])
        if world_size > 1:
            dist.all_reduce(totals)
        losses[objective] = (totals[0] / totals[1]).item()
    return losses


# --------------------------------------------------------------------------------------------------
# The run, step by step


def main(argv: list[str]):
    cfg = configure(TrainConfig, argv)
    validate(cfg)
    try:
        if cfg.export:
            export(cfg)
        else:
            pretrain(cfg, argv)
    except (ValueError, OSError, ImportError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}") from None


def export(cfg: TrainConfig):
    if cfg.export != "hf":
        raise SystemExit(f"error: --export={cfg.export!r}: the only export format is 'hf'")
    export_hf(os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "hf"))  # prints


def pretrain(cfg: TrainConfig, argv: list[str]):
    if cfg.init_from.startswith("hf:") and cfg.tokenizer != cfg.init_from:
        raise SystemExit(f"error: --init_from={cfg.init_from} needs its own tokenizer, so that its "
                         f"embedding rows keep their meaning: add --tokenizer={cfg.init_from}")
    proc = parallel.start(cfg.device, cfg.dtype)
    os.makedirs(cfg.out_dir, exist_ok=True)
    # One run at a time in an out_dir:
    # a second one would interleave the log and race on the checkpoint.
    with files.exclusive(os.path.join(cfg.out_dir, ".lock"), f"training in {cfg.out_dir}") \
            if proc.master else nullcontext():
        run(cfg, argv, proc)
    parallel.finish(proc)


def resume_settings(cfg: TrainConfig, argv: list[str],
                    ckpt_path: str) -> tuple[TrainConfig, dict | None]:
    """The settings of the run and, with --init_from=resume, the checkpoint it continues. A resumed
    run keeps its own settings; only what is given explicitly now (say, eval_interval) changes, and
    an earlier stop_at, which was for the earlier job."""
    if cfg.init_from != "resume":
        if os.path.exists(ckpt_path):
            raise SystemExit(f"error: {ckpt_path} exists; continue it with --init_from=resume, or "
                             "pick another --out_dir")
        return cfg, None
    if not os.path.exists(ckpt_path):
        raise FileNotFoundError(f"--init_from=resume: there is no {ckpt_path} to resume "
                                "(the run wrote no checkpoint yet): start it again without "
                                "--init_from=resume")
    resumed = read_checkpoint(ckpt_path)
    explicit = {a[2:].partition("=")[0] for a in argv if a.startswith("--")}
    saved = {k: v for k, v in resumed["train_config"].items()
             if k not in explicit | {"init_from", "stop_at"}}
    cfg = TrainConfig(**{**asdict(cfg), **saved})
    validate(cfg)
    return cfg, resumed


def micro_batches(cfg: TrainConfig, proc: parallel.Process) -> int:
    """Micro-batches per optimizer step on each process (gradient accumulation)."""
    per_step = cfg.total_batch_size or cfg.batch_size * proc.world_size
    if per_step % (cfg.batch_size * proc.world_size):
        raise SystemExit(f"error: total_batch_size={per_step} is not a multiple of "
                         f"batch_size * processes = {cfg.batch_size} * {proc.world_size}")
    return per_step // (cfg.batch_size * proc.world_size)


@dataclass
class Run:
    """A run under way: what the loop advances and what a checkpoint saves."""
    cfg: TrainConfig
    proc: parallel.Process
    data: Data
    raw_model: Transformer  # the weights, which the optimizer and the checkpoints see
    model: torch.nn.Module  # what the step calls: raw_model compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    loader: BlockLoader
    step: int = 0  # optimizer steps done
    saved_step: int | None = None  # the step of ckpt.pt, the last good checkpoint

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.cfg.out_dir, "ckpt.pt")

    def payload(self, weights: dict | None, **extra) -> dict:
        return checkpoint_payload(self.raw_model, weights, step=self.step,
                                  tokenizer=self.data.tokenizer, train_config=asdict(self.cfg),
                                  data=self.loader.state_dict(),
                                  objective=objective_at(self.step - 1, self.cfg), **extra)

    def save(self, val: dict):
        """ckpt.pt: everything needed to resume exactly."""
        weights, optimizer_state = parallel.full_state(self.raw_model, self.optimizer,
                                                       self.cfg.fsdp)
        if self.proc.master:
            save_checkpoint(self.payload(weights, optimizer=optimizer_state, val=val),
                            self.ckpt_path)
        self.saved_step = self.step

    def keep(self):
        """ckpt_<step>.pt: the weights alone, for fine-tuning and export (not resumable)."""
        weights = parallel.full_weights(self.raw_model, self.cfg.fsdp)
        if self.proc.master:
            save_checkpoint(self.payload(weights),
                            os.path.join(self.cfg.out_dir, f"ckpt_{self.step}.pt"))


def run(cfg: TrainConfig, argv: list[str], proc: parallel.Process):
    cfg, resumed = resume_settings(cfg, argv, os.path.join(cfg.out_dir, "ckpt.pt"))
    data = open_data(cfg, proc)
    loop(start(cfg, proc, data, resumed))


def start(cfg: TrainConfig, proc: parallel.Process, data: Data, resumed: dict | None) -> Run:
    """The model on its device, its optimizer and the data loader, at step 0 or where the resumed
    checkpoint stopped."""
    say = print if proc.master else (lambda *a, **k: None)
    raw_model, origin = build_model(cfg, data, resumed)
    raw_model.to(proc.device)
    if cfg.fsdp:
        parallel.shard(raw_model)
    optimizer = configure_optimizer(raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                    cfg.adam_eps, proc.device.type)
    loader = BlockLoader(data.dir, "train", cfg.block_size, cfg.batch_size, seed=cfg.seed,
                         rank=proc.rank, world_size=proc.world_size, device=proc.device)
    if origin.optimizer is not None:
        parallel.load_optimizer_state(raw_model, optimizer, origin.optimizer, cfg.fsdp)
    if origin.data is not None:
        loader.load_state_dict(origin.data)
    if resumed is not None:
        say(f"resuming {origin.source} at step {origin.step}")
    elif origin.source:
        say(f"continuing from {origin.source}: "
            + ("AdamW state carried over" if origin.optimizer is not None else "AdamW state empty")
            + (f", data stream at block {loader.position:,}" if origin.data else ", data from the "
               "start"))
    compile = cfg.compile == "true" or (cfg.compile == "auto" and proc.device.type == "cuda")
    model = parallel.wrap(raw_model, proc, compile, sharded=cfg.fsdp)
    return Run(cfg, proc, data, raw_model, model, optimizer, loader, origin.step,
               saved_step=origin.step if resumed is not None else None)


def describe(r: Run, grad_accum: int) -> str:
    """The line a run starts with: the model, the processes, the batch and the objectives."""
    cfg, params, switch = r.cfg, r.raw_model.num_params(), switch_step(r.cfg)
    return (f"model {cfg.model if cfg.init_from in ('scratch', 'resume') else cfg.init_from}: "
            f"{params['paper'] / 1e6:.2f}M parameters (body + embedding; "
            f"{params['total'] / 1e6:.2f}M in all) | {r.proc.world_size} process(es) on "
            f"{r.proc.device} | {grad_accum * cfg.batch_size * r.proc.world_size} x "
            f"{cfg.block_size} tokens per step ({grad_accum} micro-batch(es) of {cfg.batch_size} "
            f"each) | {cfg.objective} "
            + (f"until step {switch}, then {cfg.switch_to}" if switch is not None else "only")
            + f" | {cfg.max_steps} steps")


def loop(r: Run):
    """The training loop: a step, its log line, and every eval_interval steps both validation
    losses and a checkpoint; the objective switches on the way."""
    cfg, proc, say = r.cfg, r.proc, print if r.proc.master else (lambda *a, **k: None)
    grad_accum = micro_batches(cfg, proc)
    per_step = grad_accum * cfg.batch_size * proc.world_size  # sequences
    check_unique_data(r.loader, cfg.max_steps, r.step, per_step, cfg.repeat_data)
    tokens_per_step = per_step * cfg.block_size
    switch, kept = switch_step(cfg), kept_steps(cfg.keep_checkpoints, cfg.max_steps)
    say(describe(r, grad_accum))
    peak = peak_flops(proc.device) * proc.world_size
    generator = torch.Generator(device=proc.device)
    log = open_log(os.path.join(cfg.out_dir, "log.jsonl"), r.saved_step) if proc.master else None
    tracker = (Tracker(cfg.wandb_project, cfg.wandb_run or os.path.basename(cfg.out_dir),
                       {**asdict(cfg), "switch_step": switch}, cfg.out_dir)
               if proc.master and cfg.wandb_project else None)

    def write(record):
        if log:
            log.write(files.json_line(record))
            log.flush()
        if tracker:
            tracker.log(record)

    def validation():
        val = evaluate(r.model, cfg, r.data.vocab, r.data.dir, generator, proc.device,
                       proc.autocast, proc.rank, proc.world_size)
        write({"step": r.step, "val_clm": val["clm"], "val_mlm": val["mlm"]})
        return val

    val = validation() if r.step == 0 else None
    if val:
        say(f"step 0: val clm {val['clm']:.4f} | val mlm {val['mlm']:.4f}")
    bar = (tqdm(total=cfg.max_steps, initial=r.step, dynamic_ncols=True)
           if proc.master and cfg.progress else None)
    t_start, tokens_seen = time.perf_counter(), r.step * tokens_per_step
    while r.step < min(cfg.max_steps, cfg.stop_at or cfg.max_steps):
        objective = objective_at(r.step, cfg)
        # the paper's switch: only the objective, and with it the attention, changes
        if r.step == switch:
            say(f"\nstep {r.step}: switching {cfg.objective} -> {cfg.switch_to} (weights and "
                f"optimizer state kept, lr continues at {lr_of(r.step, cfg):.2e})")
        t0 = time.perf_counter()
        try:
            loss, grad_norm = train_step(r.model, r.optimizer, r.loader.next_batch, cfg,
                                         r.data.vocab, r.step, grad_accum, generator,
                                         proc.autocast, proc.rank, proc.world_size)
        except FloatingPointError as e:
            raise FloatingPointError(f"{e}; stopping. {last_good(r.ckpt_path, r.saved_step)}") \
                from None
        dt = time.perf_counter() - t0
        r.step += 1
        tokens_seen += tokens_per_step
        causal = objective == "clm"
        flops = r.raw_model.flops_per_token(cfg.block_size, causal,
                                            1.0 if causal else cfg.mask_ratio)
        record = {"step": r.step, "objective": objective, "loss": loss.item(),
                  "lr": lr_of(r.step - 1, cfg), "grad_norm": grad_norm.item(),
                  "tokens": tokens_seen, "tokens_per_s": tokens_per_step / dt,
                  "mfu": flops * tokens_per_step / dt / peak}
        write(record)
        if bar:
            bar.update(1)
            bar.set_postfix_str(f"{objective} loss {record['loss']:.3f} lr {record['lr']:.1e} "
                                f"{record['tokens_per_s']:,.0f} tok/s")
        if ((cfg.eval_interval and r.step % cfg.eval_interval == 0)
                or r.step in (cfg.max_steps, cfg.stop_at)):
            val = validation()
            if bar:
                bar.write(f"step {r.step}: val clm {val['clm']:.4f} | val mlm {val['mlm']:.4f} "
                          f"({objective} phase)")
            try:
                r.save(val)
            except FloatingPointError as e:
                raise FloatingPointError(f"{e}. {last_good(r.ckpt_path, r.saved_step)}") from None
        if r.step in kept:
            r.keep()
    if bar:
        bar.close()

    elapsed = time.perf_counter() - t_start
    val = val or validation()
    if proc.master:
        summary = {"steps": r.step, "max_steps": cfg.max_steps, "switch_step": switch,
                   "tokens": tokens_seen, "val_clm": val["clm"], "val_mlm": val["mlm"],
                   "seconds": elapsed, "checkpoint": r.ckpt_path}
        files.write_text_atomically(os.path.join(cfg.out_dir, "summary.json"),
                                    json.dumps(files.strict(summary), indent=1))
        done = ("finished" if r.step == cfg.max_steps
                else f"stopped at step {r.step} (resume with --init_from=resume)")
        say(f"{done} in {elapsed:.0f}s: val clm {val['clm']:.4f} | val mlm {val['mlm']:.4f} | "
            f"{r.ckpt_path}")
    if tracker:
        tracker.finish()


if __name__ == "__main__":
    main(sys.argv[1:])
