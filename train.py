"""Pretrain the model with CLM, MLM, or one then the other, at a fixed step budget.

    python train.py                                    # CPU demo: CLM then MLM on docstrings
    python train.py --objective=mlm --switch_to=none   # pure MLM
    python train.py config/610m.py --switch_at=0.25    # a paper preset (config/)
    torchrun --nproc_per_node=8 train.py config/610m.py --objective=clm --switch_to=mlm
    python train.py --help                             # every setting, its default and meaning

Settings, the switch, continued pretraining, resume and checkpoints: docs/pretraining.md."""

import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from data import BlockLoader
from mlm_vs_clm import parallel, runs
from mlm_vs_clm.checkpoints import kept_steps, source_problem
from mlm_vs_clm.parallel import device_problem
from mlm_vs_clm.settings import above, at_least, check, command, configure, one_of
from mlm_vs_clm.tokenizer import tokenizer_problem
from model import ATTENTION, lr_at
from objectives import MASK_REPLACE, OBJECTIVES, mask_draws, switch_step

@dataclass
class TrainConfig:
    # data
    data: str = "docstrings"  # docstrings (offline), fineweb-edu[:config], or .txt/.jsonl path/glob
    data_dir: str = ""  # prepared token files; "" = data/<data>_<tokenizer>, prepared on first use
    data_tokens: int = 0  # token budget when preparing a streamed source (fineweb-edu); 0 = all
    repeat_data: bool = False  # allow reading training blocks twice; the paper's data never repeats
    tokenizer: str = "cl100k_8k"  # "cl100k" (paper-like), "cl100k_<N>k" (its first N*1024 merges)
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
    log_interval: int = 10  # steps between printed lines when there is no progress bar
    out_dir: str = "out/demo"  # checkpoint ckpt.pt, log.jsonl and summary.json go here
    init_from: str = "scratch"  # scratch, resume, a checkpoint, or hf:DIR (HF Llama or EuroBERT)
    stop_at: int = 0  # stop after this step with a checkpoint, to resume later; 0 = run to the end
    keep_checkpoints: str = ""  # also keep the weights at steps "1000,5000" or "every:1000"
    load_optimizer: bool = True  # init_from=CKPT: start from its AdamW state, else an empty one
    # system
    device: str = "auto"  # "auto" (cuda, then mps, then cpu), or a torch device string
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on CUDA, else float32), bfloat16, float32
    compile: str = "auto"  # torch.compile the model: "auto" (on CUDA), "true", "false"
    seed: int = 0  # model init, data order and masking all derive from it
    progress: bool = True  # tqdm progress bar on a terminal; else plain log lines
    wandb_project: str = ""  # also log to Weights & Biases in this project; "" = off
    wandb_run: str = ""  # the W&B run name; "" = the out_dir's name
    fsdp: bool = False  # FSDP2: shard parameters, gradients and AdamW state instead of DDP's copies

    def checks(self):
        switch = switch_step(self.switch_to, self.switch_at, self.max_steps) \
            if self.switch_to in OBJECTIVES else None
        try:
            kept_steps(self.keep_checkpoints, self.max_steps)
            kept = None
        except ValueError as e:
            kept = str(e)
        source = None if self.init_from in ("scratch", "resume") \
            else source_problem("init_from", self.init_from)
        return [
            *one_of(self, "objective", OBJECTIVES),
            *one_of(self, "switch_to", (*OBJECTIVES, "none")),
            (self.switch_to != self.objective,
             "--switch_to equals --objective; use --switch_to=none for a single objective"),
            (0 < self.switch_at < self.max_steps,
             "--switch_at must be a fraction in (0, 1) or a step in [1, max_steps)"),
            (switch is None or 0 < switch < self.max_steps,
             f"--switch_at={self.switch_at:g} puts the switch at step {switch} of {self.max_steps}:"
             " a phase would be empty; choose a switch inside the run, or --switch_to=none"),
            (0 < self.mask_ratio < 1, "--mask_ratio must be in (0, 1)"),
            *one_of(self, "mask_replace", MASK_REPLACE), *one_of(self, "attention", ATTENTION),
            *at_least(self, 1, "max_steps", "batch_size", "eval_batches", "log_interval"),
            *at_least(self, 2, "block_size"), *above(self, 0, "lr", "adam_eps"),
            *at_least(self, 0, "total_batch_size", "warmup_steps", "decay_steps", "eval_interval",
                      "stop_at", "data_tokens", "seed", "weight_decay", "beta1", "beta2"),
            (self.beta1 < 1 and self.beta2 < 1, "--beta1 and --beta2 must be below 1"),
            (self.warmup_steps + self.decay_steps <= self.max_steps,
             "--warmup_steps + --decay_steps must fit in --max_steps"),
            (self.grad_clip >= 0, "--grad_clip must be >= 0 (0 = off; a negative bound ascends)"),
            *one_of(self, "dtype", ("auto", "bfloat16", "float32")),
            *one_of(self, "compile", ("auto", "true", "false")),
            (self.out_dir.strip() != "", "--out_dir must name a directory"),
            (device_problem(self.device) is None, device_problem(self.device)),
            (tokenizer_problem(self.tokenizer) is None, tokenizer_problem(self.tokenizer)),
            (source is None, source), (kept is None, kept),
            (not self.init_from.startswith("hf:") or self.tokenizer == self.init_from,
             f"--init_from={self.init_from} needs its own tokenizer, so that its embedding rows "
             f"keep their meaning: add --tokenizer={self.init_from}"),
        ]

# One optimizer step, and validation

def reseed(generator: torch.Generator, *keys: int) -> torch.Generator:
    """Masks depend on (seed, step, micro-batch) only: the same on resume, for any process count."""
    return generator.manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))

def train_step(run: runs.Run, objective: str, lr: float, generator: torch.Generator):
    """Forward and backward over the micro-batches, one AdamW step; (mean loss, grad norm) stay on
    the device. The mean is over every predicted token of all micro-batches and processes."""
    cfg, proc, model = run.cfg, run.proc, run.loss
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = n_sum = 0
    for micro in range(run.grad_accum):
        tokens = run.loader.next_batch()
        last = micro == run.grad_accum - 1
        # DDP all-reduces gradients only on the last micro-step; FSDP2 reduce-scatters once there
        if cfg.fsdp:
            run.raw_model.set_requires_gradient_sync(last)
        draws = mask_draws(tokens.shape, cfg.mask_replace, reseed(
            generator, cfg.seed, run.step, micro * proc.world_size + proc.rank), tokens.device) \
            if objective == "mlm" else None
        with (model.no_sync() if hasattr(model, "no_sync") and not last else nullcontext()), \
                proc.autocast():
            loss, n = model(tokens, objective, draws)
        (loss * n).backward()  # the sum over predicted tokens, normalised once the count is known
        loss_sum, n_sum = loss_sum + loss.detach() * n, n_sum + n
    totals = torch.stack([loss_sum, n_sum.to(loss_sum.dtype)])
    if proc.world_size > 1:
        dist.all_reduce(totals)
    mean_loss, n_total = totals[0] / totals[1], totals[1]
    # DDP averaged the gradient sums over processes: make that the mean over every predicted token
    grads = [p.grad for p in run.raw_model.parameters() if p.grad is not None]
    torch._foreach_mul_(grads, proc.world_size / n_total)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(),
                                               cfg.grad_clip or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    # a non-finite loss or gradient: fused AdamW skips the update on the device, no host sync
    finite = torch.isfinite(mean_loss) & torch.isfinite(grad_norm)
    run.optimizer.found_inf = (~finite).float()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return mean_loss, grad_norm

@torch.no_grad()
def evaluate(run: runs.Run, generator) -> dict:
    """Validation loss under BOTH objectives (the switch's transfer shows), the same masked blocks.
    Every process runs every forward (FSDP gathers weights); those past eval_batches weigh 0."""
    cfg, proc, losses = run.cfg, run.proc, {}
    for objective in OBJECTIVES:
        loader = BlockLoader(run.token_files.dir, "val", cfg.block_size, cfg.batch_size, seed=0,
                             rank=proc.rank, world_size=proc.world_size, device=proc.device)
        totals = torch.zeros(2, device=proc.device)
        # global micro-batch g = k * world_size + rank: the same blocks for any number of processes
        for k in range(math.ceil(cfg.eval_batches / proc.world_size)):
            tokens, g = loader.next_batch(), k * proc.world_size + proc.rank
            draws = mask_draws(tokens.shape, cfg.mask_replace, reseed(generator, 1, g),
                               tokens.device) if objective == "mlm" else None
            with proc.autocast():
                loss, n = run.loss(tokens, objective, draws)
            totals += (g < cfg.eval_batches) * torch.stack([loss.float() * n, n.float()])
        if proc.world_size > 1:
            dist.all_reduce(totals)
        losses[objective] = (totals[0] / totals[1]).item()
    return losses

# The run: settings, setup, then the loop

@command
def main(argv: list[str]):
    # the settings: defaults < config files < --key=value; a resumed run keeps its own
    cfg = configure(TrainConfig, argv, check_now=False)
    cfg, resumed = runs.resume_settings(cfg, argv, int(os.environ.get("WORLD_SIZE", 1)))
    check(cfg)
    if resumed and resumed["step"] >= min(cfg.max_steps, cfg.stop_at or cfg.max_steps):
        print(f"nothing to train: {cfg.out_dir}/ckpt.pt is at step {resumed['step']} of "
              f"{cfg.max_steps} (a larger --max_steps extends the run)")
        return
    # the setup: data, model, optimizer and loader, at step 0 or where the checkpoint stopped
    proc = parallel.setup(cfg.device, cfg.dtype)
    run = runs.start(cfg, proc, resumed)
    switch, kept = run.switch, kept_steps(cfg.keep_checkpoints, cfg.max_steps)
    generator = torch.Generator(device=proc.device)

    def validation():
        val = evaluate(run, generator)
        log.write({"step": run.step, "val_clm": val["clm"], "val_mlm": val["mlm"]})
        phase = f" ({run.objective} phase)" if run.objective else ""
        proc.print(f"step {run.step}: val clm {val['clm']:.4f} | val mlm {val['mlm']:.4f}{phase}")
        return val

    # the loop
    with run:  # it holds the out_dir; Ctrl-C ends it with a line saying what was saved
        log = runs.RunLog(run)
        proc.print(run.describe())
        val, t_start = validation() if run.step == 0 else None, time.perf_counter()
        while run.step < min(cfg.max_steps, cfg.stop_at or cfg.max_steps):
            # the paper's switch: the objective, and with it the attention, changes; nothing else
            run.objective = cfg.objective if switch is None or run.step < switch else cfg.switch_to
            lr = lr_at(run.step, cfg.lr, cfg.max_steps, cfg.warmup_steps, cfg.decay_steps)
            if run.step == switch:
                proc.print(f"step {run.step}: switching {cfg.objective} -> {cfg.switch_to} "
                           f"(weights and optimizer state kept, lr continues at {lr:.2e})")
            loss, grad_norm = train_step(run, run.objective, lr, generator)
            run.step += 1
            log.add(loss, grad_norm, lr)
            validate_now = (cfg.eval_interval and run.step % cfg.eval_interval == 0) \
                or run.step in (cfg.max_steps, cfg.stop_at)
            if validate_now or run.step % cfg.log_interval == 0 or run.step in kept:
                log.flush()  # the host sees the losses: every log_interval steps, not every step
            if validate_now:
                val = validation()
                run.save(val)
            if run.step in kept:
                run.keep()
            if validate_now or run.step in kept:
                log.restart_clock()
        log.flush()
        val = val or validation()
        if proc.master:
            runs.write_summary(run, val, run.step * run.tokens_per_step,
                               time.perf_counter() - t_start)
        log.close()
    parallel.finish(proc)

if __name__ == "__main__":
    main(sys.argv[1:])
