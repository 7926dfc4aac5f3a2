"""
Pretrain the model with CLM, MLM, or one then the other, at a fixed step budget.

    python train.py                                          # CPU demo: CLM then MLM on the docstring corpus
    python train.py --objective=mlm --switch_to=none         # pure MLM
    python train.py config/610m.py --switch_at=0.25          # a paper preset (see config/)
    torchrun --nproc_per_node=8 train.py config/610m.py --objective=clm --switch_to=mlm
    python train.py --init_from=out/clm/ckpt.pt --objective=mlm --switch_to=none --out_dir=out/cpt   # continued
                                                             # pretraining (CPT) from another run's weights
    python train.py --help                                   # every setting, its default and meaning

Settings come from the defaults below, then config files given as arguments (plain Python assigning some of the
names), then --key=value overrides, in that order.

The objective switch is the paper's: at `switch_at` the weights and the optimizer state carry over, attention
becomes bidirectional (or causal, for MLM -> CLM) and the learning rate continues on the same schedule, without a new
warmup; the only decay is at the end of the whole budget.
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
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP

import files
from data import TOKENIZER_FIELDS, BlockLoader, check_tokenizer, default_data_dir, get_tokenizer, load_meta, prepare
from model import (Transformer, checkpoint_payload, configure_optimizer, export_hf, load_checkpoint, load_hf,
                   model_config)
from objectives import MASK_REPLACE, OBJECTIVES, Vocab, pretraining_loss
from settings import configure


@dataclass
class TrainConfig:
    # data
    data: str = "docstrings"  # "docstrings" (offline), "fineweb-edu[:config]", or a .txt/.jsonl path or glob
    data_dir: str = ""  # prepared token files; "" = data/<data>_<tokenizer>, prepared on first use
    data_tokens: int = 0  # token budget when preparing a streamed source (fineweb-edu); 0 = all
    tokenizer: str = "cl100k_8k"  # "cl100k" (the paper-like vocabulary) or "cl100k_<N>k" (its first N*1024 merges)
    # model
    model: str = "tiny"  # preset in model.py: test, tiny, 210m, 610m, 1b
    block_size: int = 128  # tokens per sequence (the paper: 2048)
    attention: str = "sdpa"  # "sdpa" or "manual" (hand-written scores, mask and softmax; slower, same result)
    # objective
    objective: str = "clm"  # objective of the first phase: clm or mlm
    switch_to: str = "mlm"  # objective after the switch: mlm, clm, or none for a single-objective run
    switch_at: float = 0.25  # when to switch: a fraction of max_steps if < 1 (the paper's 0.25/0.5/0.75), else a step
    mask_ratio: float = 0.4  # MLM: probability that a token is masked (the paper's default)
    mask_replace: str = "mask"  # MLM: "mask" (all selected -> <|mask|>, the paper's code) or "bert" (80/10/10)
    sparse_head: bool = True  # MLM: run the LM head on the masked positions only (same loss, less work)
    # optimisation
    max_steps: int = 200  # optimizer steps in the whole budget, both phases together
    batch_size: int = 8  # sequences per micro-batch on each process
    total_batch_size: int = 0  # sequences per optimizer step over all processes; 0 = one micro-batch each
    lr: float = 2e-3  # peak learning rate (the paper: 5e-4 at its batch size)
    warmup_steps: int = 20  # linear warmup from 0 (the paper: 2000)
    decay_steps: int = 40  # linear decay to 0 at the end of the budget (the paper: 2000)
    weight_decay: float = 0.1  # AdamW, matrices only
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95  # AdamW
    adam_eps: float = 1e-5  # AdamW
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    # evaluation, logging, checkpoints
    eval_interval: int = 25  # steps between validation (both objectives) and checkpoint; 0 = only at the end
    eval_batches: int = 4  # micro-batches per validation loss
    out_dir: str = "out/demo"  # checkpoint ckpt.pt, log.jsonl and summary.json go here
    init_from: str = "scratch"  # "scratch", "resume" (out_dir/ckpt.pt), a checkpoint path, or hf:DIR (an HF Llama)
    stop_at: int = 0  # stop after this step with a checkpoint, to resume later (time-limited jobs); 0 = run to the end
    # system
    device: str = "auto"  # "auto" (cuda, then mps, then cpu), or a torch device string
    dtype: str = "auto"  # autocast dtype: "auto" (bfloat16 on CUDA, float32 elsewhere), "bfloat16", "float32"
    compile: str = "auto"  # torch.compile the model: "auto" (on CUDA), "true", "false"
    seed: int = 0  # model init, data order and masking all derive from it
    progress: bool = True  # tqdm progress bar
    fsdp: bool = False  # shard parameters, gradients and AdamW state over processes (FSDP2) instead of DDP's copies
    export: str = ""  # "hf": write out_dir/ckpt.pt as a Hugging Face Llama directory out_dir/hf, then exit


# ----------------------------------------------------------------------------------------------------------------
# Settings: defaults < config files < --key=value (settings.py)


def validate(cfg: TrainConfig):
    checks = [
        (cfg.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}"),
        (cfg.switch_to in OBJECTIVES + ("none",), f"switch_to must be one of {OBJECTIVES + ('none',)}"),
        (cfg.switch_to != cfg.objective, "switch_to equals objective; use --switch_to=none for a single objective"),
        (0 < cfg.switch_at < cfg.max_steps, "switch_at must be a fraction in (0, 1) or a step in [1, max_steps)"),
        (0 < cfg.mask_ratio < 1, "mask_ratio must be in (0, 1)"),
        (cfg.mask_replace in MASK_REPLACE, f"mask_replace must be one of {MASK_REPLACE}"),
        (cfg.max_steps > 0 and cfg.batch_size > 0 and cfg.block_size > 1, "max_steps, batch_size, block_size > 0"),
        (cfg.warmup_steps + cfg.decay_steps <= cfg.max_steps, "warmup_steps + decay_steps must fit in max_steps"),
        (cfg.lr > 0, "lr must be positive"),
        (cfg.grad_clip >= 0, "grad_clip must be >= 0 (0 = off; a negative bound would turn clipping into ascent)"),
        (cfg.dtype in ("auto", "bfloat16", "float32"), "dtype must be auto, bfloat16 or float32"),
        (cfg.compile in ("auto", "true", "false"), "compile must be auto, true or false"),
        (cfg.stop_at >= 0 and cfg.eval_interval >= 0, "stop_at and eval_interval must be >= 0"),
        (cfg.eval_batches > 0, "eval_batches must be >= 1"),
    ]
    problems = [message for ok, message in checks if not ok]
    switch = switch_step(cfg) if not problems and cfg.switch_to != "none" else None
    if switch is not None and not 0 < switch < cfg.max_steps:
        problems.append(f"switch_at={cfg.switch_at:g} puts the switch at step {switch} of {cfg.max_steps}, which "
                        "leaves one phase empty: choose a switch inside the run, or --switch_to=none")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


def data_dir_of(config: dict) -> str:
    """Where a run's token files are, from its TrainConfig as a dict (a checkpoint's train_config): its data_dir, or
    the default directory of its data and tokenizer."""
    return config.get("data_dir") or default_data_dir(config.get("data", ""), config.get("tokenizer", ""))


# ----------------------------------------------------------------------------------------------------------------
# The schedule and the objective switch


def switch_step(cfg: TrainConfig):
    """The first step of the second phase, or None for a single-objective run."""
    if cfg.switch_to == "none":
        return None
    return round(cfg.switch_at * cfg.max_steps) if cfg.switch_at < 1 else int(cfg.switch_at)


def objective_at(step: int, cfg: TrainConfig) -> str:
    switch = switch_step(cfg)
    return cfg.objective if switch is None or step < switch else cfg.switch_to


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Warmup-stable-decay, the paper's schedule: linear warmup from 0, constant, then linear decay reaching 0 right
    after the last step. It spans the whole budget, so the objective switch does not touch it."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_start = cfg.max_steps - cfg.decay_steps
    if step >= decay_start:
        return cfg.lr * (cfg.max_steps - step) / cfg.decay_steps
    return cfg.lr


# ----------------------------------------------------------------------------------------------------------------
# One optimizer step, shared with bench.py


def reseed(generator: torch.Generator, *keys: int) -> torch.Generator:
    """Masking randomness is a pure function of (seed, step, which micro-batch of the step): a resumed run masks
    exactly as an uninterrupted one, with no generator state to save, and 2 processes of 1 micro-batch mask exactly
    as 1 process of 2."""
    return generator.manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


def train_step(model, optimizer, next_batch, cfg: TrainConfig, vocab: Vocab, step: int, grad_accum: int,
               generator: torch.Generator, autocast=nullcontext, rank: int = 0, world_size: int = 1):
    """Forward and backward over grad_accum micro-batches, then one AdamW step. Returns (mean loss, grad norm) as
    tensors. The loss is averaged exactly over every predicted token of every micro-batch on every process: MLM
    predicts a different number of tokens each time, so averaging per-micro-batch means would weigh them wrongly."""
    objective = objective_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    loss_sum = n_sum = 0
    for micro in range(grad_accum):
        tokens = next_batch()
        last = micro == grad_accum - 1
        # Under DDP, gradients are all-reduced only on the last micro-step; the others accumulate locally. FSDP2
        # keeps them unsharded until the last micro-step, then reduce-scatters once.
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(last)
        with (model.no_sync() if isinstance(model, DDP) and not last else nullcontext()), autocast():
            loss, n = pretraining_loss(model, tokens, objective, vocab, mask_ratio=cfg.mask_ratio,
                                       mask_replace=cfg.mask_replace, sparse_head=cfg.sparse_head,
                                       generator=reseed(generator, cfg.seed, step, micro * world_size + rank))
        (loss * n).backward()  # the sum over predicted tokens; normalised below once the global count is known
        loss_sum, n_sum = loss_sum + loss.detach() * n, n_sum + n
    totals = torch.stack([loss_sum, n_sum.to(loss_sum.dtype)])
    if world_size > 1:
        dist.all_reduce(totals)
    mean_loss, n_total = totals[0] / totals[1], totals[1]
    # DDP averaged the gradient sums over processes; turn that into the mean over every predicted token.
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    torch._foreach_mul_(grads, world_size / n_total)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
    # The one host sync of the step: a non-finite loss or gradient never reaches the weights. A finite loss can
    # come with an infinite gradient (a huge learning rate overflows the backward pass first).
    if not torch.isfinite(torch.stack([mean_loss, grad_norm.to(mean_loss.dtype)])).all():
        raise FloatingPointError(f"step {step + 1} ({objective}) has loss {mean_loss.item():.4g} and gradient norm "
                                 f"{grad_norm.item():.4g}; its update was not applied")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return mean_loss, grad_norm


@torch.no_grad()
def evaluate(model, cfg: TrainConfig, vocab: Vocab, data_dir: str, generator, device, autocast=nullcontext,
             rank: int = 0, world_size: int = 1) -> dict:
    """Validation loss under BOTH objectives, whatever the current one, so the transfer at the switch shows. Every
    evaluation reads the same first blocks of the validation split and masks them the same way; all processes take
    part and their sums are reduced, so the figure is the loss over all predicted tokens."""
    losses = {}
    for objective in OBJECTIVES:
        loader = BlockLoader(data_dir, "val", cfg.block_size, cfg.batch_size, seed=0, rank=rank,
                             world_size=world_size, device=device)
        totals = torch.zeros(2, device=device)
        # Global micro-batch g = k * world_size + rank covers the same blocks whatever the number of processes.
        for k in range(math.ceil(cfg.eval_batches / world_size)):
            tokens, g = loader.next_batch(), k * world_size + rank
            if g < cfg.eval_batches:
                with autocast():
                    loss, n = pretraining_loss(model, tokens, objective, vocab, mask_ratio=cfg.mask_ratio,
                                               mask_replace=cfg.mask_replace, generator=reseed(generator, 1, g))
                totals += torch.stack([loss.float() * n, n.float()])
        if world_size > 1:
            dist.all_reduce(totals)
        losses[objective] = (totals[0] / totals[1]).item()
    return losses


# ----------------------------------------------------------------------------------------------------------------
# Hardware


GPU_PEAK_BF16 = {  # dense bf16 tensor-core FLOP/s from the vendors' data sheets, by a substring of the device name
    "H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "GH200": 989e12,
    "B200": 2250e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12, "A10": 125e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12,
}


def peak_flops(device: torch.device) -> float:
    """Peak FLOP/s of one device, for MFU: the data-sheet figure for known GPUs; on a CPU, measured with a large
    float32 matmul (so CPU MFU is against what this machine's BLAS really reaches)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in GPU_PEAK_BF16.items() if key in name), float("nan"))
    if device.type != "cpu":
        return float("nan")
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = float("inf")
    for _ in range(5):  # the best of several tries: other work on the machine only ever makes a try slower
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024 ** 3 * 4 / best


def device_and_autocast(device: str, dtype: str, local_rank: int = 0, world_size: int = 1):
    """The torch device of a --device setting ("auto": cuda, then mps, then cpu; under torchrun each process takes
    the GPU of its local rank) and an autocast factory for a --dtype setting ("auto": bfloat16 on CUDA, float32
    elsewhere). train.py, finetune.py and bench.py all choose their device here."""
    if device == "auto":
        kind = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    else:
        kind = device.split(":")[0]
    chosen = torch.device(device if device != "auto" else kind)
    if chosen.type == "cuda" and (world_size > 1 or chosen.index is None):
        chosen = torch.device("cuda", local_rank)  # one GPU per torchrun process; set_device needs an index
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls outside autocast on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    if (dtype if dtype != "auto" else "bfloat16" if chosen.type == "cuda" else "float32") == "bfloat16":
        return chosen, lambda: torch.autocast(device_type=chosen.type, dtype=torch.bfloat16)
    return chosen, nullcontext


def setup_device(cfg: TrainConfig):
    """(device, autocast factory, rank, local_rank, world_size), joining the process group under torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device, autocast = device_and_autocast(cfg.device, cfg.dtype, local_rank, world_size)
    if world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, autocast, rank, local_rank, world_size


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and logs: written atomically (files.py), never with a non-finite tensor in them


def first_non_finite(tree, name: str = "") -> str | None:
    """The name of the first floating-point tensor in nested dicts and lists that holds a NaN or an inf."""
    if isinstance(tree, torch.Tensor):
        return name if tree.is_floating_point() and not torch.isfinite(tree).all() else None
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return None
    for key, value in items:
        bad = first_non_finite(value, f"{name}.{key}" if name else str(key))
        if bad is not None:
            return bad
    return None


def save_checkpoint(payload: dict, path: str) -> None:
    bad = first_non_finite(payload)
    if bad is not None:
        raise FloatingPointError(f"{bad} holds non-finite values at step {payload['step']}, so it was not saved")
    files.write_atomically(path, lambda tmp: torch.save(payload, tmp))


def last_good(ckpt_path: str, step: int | None) -> str:
    if step is None:
        return f"No checkpoint of this run was written yet ({ckpt_path} does not exist)"
    return f"The last good checkpoint is {ckpt_path} (step {step}): resume from it with --init_from=resume"


def open_log(path: str, resumed_step: int | None):
    """log.jsonl for appending. A resumed run keeps its records up to the checkpoint's step (what an interrupted run
    wrote after it is redone); a new run starts an empty log. Either way the file is replaced atomically, so a crash
    here loses nothing."""
    records = files.read_json_lines(path) if resumed_step is not None else []
    kept = [r for r in records if r.get("step", math.inf) <= resumed_step]
    files.write_text_atomically(path, "".join(files.json_line(r) for r in kept))
    return open(path, "a", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------


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
    print(f"wrote {export_hf(os.path.join(cfg.out_dir, 'ckpt.pt'), os.path.join(cfg.out_dir, 'hf'))}")


def pretrain(cfg: TrainConfig, argv: list[str]):
    if cfg.init_from.startswith("hf:") and cfg.tokenizer != cfg.init_from:
        raise SystemExit(f"error: --init_from={cfg.init_from} needs its own tokenizer, so that its embedding rows keep "
                         f"their meaning: add --tokenizer={cfg.init_from}")
    device, autocast, rank, local_rank, world_size = setup_device(cfg)
    master = rank == 0
    os.makedirs(cfg.out_dir, exist_ok=True)
    # One run at a time in an out_dir: a second one would interleave the log and race on the checkpoint.
    with files.exclusive(os.path.join(cfg.out_dir, ".lock"), f"training in {cfg.out_dir}") if master \
            else nullcontext():
        run(cfg, argv, device, autocast, rank, local_rank, world_size)


def run(cfg: TrainConfig, argv: list[str], device, autocast, rank: int, local_rank: int, world_size: int):
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")

    resumed, continue_data = None, None
    if cfg.init_from == "resume":
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"--init_from=resume: there is no {ckpt_path} to resume (the run wrote no "
                                    "checkpoint yet): start it again without --init_from=resume")
        raw_model, resumed = load_checkpoint(ckpt_path)
        explicit = {a[2:].partition("=")[0] for a in argv if a.startswith("--")}
        # The run continues with its own settings; only what is given explicitly now (say, eval_interval) changes,
        # and an earlier stop_at, which was for the earlier job.
        saved = {k: v for k, v in resumed["train_config"].items() if k not in explicit | {"init_from", "stop_at"}}
        cfg = TrainConfig(**{**asdict(cfg), **saved})
        validate(cfg)
    elif os.path.exists(ckpt_path):
        raise SystemExit(f"error: {ckpt_path} exists; continue it with --init_from=resume, or pick another --out_dir")

    # Data: prepared once (by one process), then memory-mapped by all.
    data_dir = data_dir_of(asdict(cfg))
    if master:  # a no-op when prepared; when two runs start at once, one prepares and the other waits for it
        prepare(cfg.data, data_dir, cfg.tokenizer, max_tokens=cfg.data_tokens or None, reuse=True)
    if world_size > 1:
        dist.barrier()
    meta = load_meta(data_dir)
    tokenizer_meta = {k: meta.get(k) for k in TOKENIZER_FIELDS}
    # meta.json is a file like any other: its vocabulary and special ids must be the named tokenizer's
    meta_path = os.path.join(data_dir, "meta.json")
    check_tokenizer(tokenizer_meta, get_tokenizer(cfg.tokenizer).meta(), f"--tokenizer={cfg.tokenizer}", meta_path)
    vocab = Vocab(meta["n_vocab"], meta["mask_id"], (meta["eot_id"], meta["mask_id"], meta["pad_id"]), meta["pad_id"])

    # Model: from scratch, from this run's checkpoint, or from another run's weights (continued pretraining).
    torch.manual_seed(cfg.seed)
    if cfg.init_from.startswith("hf:"):
        raw_model = load_hf(cfg.init_from.removeprefix("hf:"), get_tokenizer(cfg.tokenizer))
    elif cfg.init_from not in ("scratch", "resume"):
        raw_model, source = load_checkpoint(cfg.init_from)
        check_tokenizer(tokenizer_meta, source["tokenizer"], cfg.init_from, meta_path)
        # Continued pretraining on the data its source was trained on reads on from where that run stopped, so its
        # steps see new blocks, as the paper's CPT (steps 42k-64k of one data stream) does.
        saved = source.get("train_config", {})
        same_stream = (os.path.realpath(data_dir_of(saved)) == os.path.realpath(data_dir) and "data" in source
                       and saved.get("seed") == cfg.seed and saved.get("block_size") == cfg.block_size)
        continue_data = source["data"] if same_stream else None
        del source
    elif cfg.init_from == "scratch":
        raw_model = Transformer(model_config(cfg.model, vocab_size=vocab.size, block_size=cfg.block_size))
    if raw_model.config.block_size < cfg.block_size:
        raise SystemExit(f"error: the checkpoint's block_size {raw_model.config.block_size} < {cfg.block_size}")
    raw_model.config.attention = cfg.attention  # how attention is computed is not part of the weights
    raw_model.to(device)
    if cfg.fsdp:
        # FSDP2: each block is one unit whose weights are all-gathered just before it runs and freed after, so a
        # rank holds 1/world_size of the weights, gradients and AdamW state plus one block in full. The root unit
        # holds the rest (embedding, final norm, LM head) and stays gathered after its forward, which is what lets
        # objectives.py call the LM head outside forward(); the gradients it gets there are reduce-scattered at
        # the end of backward like the others.
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            raise SystemExit(f"error: --fsdp needs FSDP2, in torch >= 2.6 (this is {torch.__version__})") from None
        for block in raw_model.blocks:
            fully_shard(block)
        fully_shard(raw_model)
    optimizer = configure_optimizer(raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.adam_eps,
                                    device.type)
    step = 0
    loader = BlockLoader(data_dir, "train", cfg.block_size, cfg.batch_size, seed=cfg.seed, rank=rank,
                         world_size=world_size, device=device)
    saved_step = None  # the step of the checkpoint in ckpt_path, the last good one
    if resumed is not None:
        check_tokenizer(tokenizer_meta, resumed["tokenizer"], ckpt_path, meta_path)
        if cfg.fsdp:  # a full (gathered) optimizer state, keyed by parameter name: each rank keeps its shard
            set_optimizer_state_dict(raw_model, optimizer, resumed["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(resumed["optimizer"])
        loader.load_state_dict(resumed["data"])
        step = saved_step = resumed["step"]
        say(f"resuming {ckpt_path} at step {step}")
    elif continue_data is not None:
        loader.load_state_dict(continue_data)
        say(f"continuing {cfg.init_from}'s data stream at block {loader.position:,}")
    del resumed  # the optimizer state now lives in the optimizer; do not keep a second copy

    model = raw_model
    if cfg.compile == "true" or (cfg.compile == "auto" and device.type == "cuda"):
        model = torch.compile(model)
    if world_size > 1 and not cfg.fsdp:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)

    per_step = cfg.total_batch_size or cfg.batch_size * world_size
    if per_step % (cfg.batch_size * world_size):
        raise SystemExit(f"error: total_batch_size={per_step} is not a multiple of batch_size * processes = "
                         f"{cfg.batch_size} * {world_size}")
    grad_accum = per_step // (cfg.batch_size * world_size)
    tokens_per_step = per_step * cfg.block_size
    params = raw_model.num_params()
    switch = switch_step(cfg)
    origin = cfg.model if cfg.init_from in ("scratch", "resume") else cfg.init_from
    say(f"model {origin}: {params['paper'] / 1e6:.2f}M parameters (body + embedding; {params['total'] / 1e6:.2f}M "
        f"in all) | {world_size} process(es) on {device} | {per_step} x {cfg.block_size} tokens per step "
        f"({grad_accum} micro-batch(es) of {cfg.batch_size} each) | {cfg.objective} "
        + (f"until step {switch}, then {cfg.switch_to}" if switch is not None else "only")
        + f" | {cfg.max_steps} steps")
    peak = peak_flops(device) * world_size
    generator = torch.Generator(device=device)

    log = open_log(os.path.join(cfg.out_dir, "log.jsonl"), saved_step) if master else None

    def write(record):
        if log:
            log.write(files.json_line(record))
            log.flush()

    def checkpoint(val=None):
        # Under FSDP the full state is gathered to rank 0 (every rank must take part) and saved in the usual
        # ckpt.pt: one format for every run, which export, fine-tuning and a resume with any world size read.
        # It costs rank 0 CPU memory for a full copy (16 bytes a parameter with AdamW); sharded DCP files would
        # not, but would need a second format everywhere else.
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(raw_model, options=full) if cfg.fsdp else None
        optimizer_state = get_optimizer_state_dict(raw_model, optimizer, options=full) if cfg.fsdp \
            else optimizer.state_dict()
        if master:
            save_checkpoint(checkpoint_payload(raw_model, weights, optimizer=optimizer_state, step=step,
                                               tokenizer=tokenizer_meta, train_config=asdict(cfg),
                                               data=loader.state_dict(), objective=objective_at(step - 1, cfg),
                                               val=val), ckpt_path)

    def run_eval():
        val = evaluate(model, cfg, vocab, data_dir, generator, device, autocast, rank, world_size)
        write({"step": step, "val_clm": val["clm"], "val_mlm": val["mlm"]})
        return val

    val = run_eval() if step == 0 else None
    if val:
        say(f"step 0: val clm {val['clm']:.4f} | val mlm {val['mlm']:.4f}")
    bar = None
    if master and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_steps, initial=step, dynamic_ncols=True)
    t_start, tokens_seen = time.perf_counter(), step * tokens_per_step
    last_stop = cfg.stop_at or cfg.max_steps
    while step < min(cfg.max_steps, last_stop):
        objective = objective_at(step, cfg)
        if step == switch:
            say(f"\nstep {step}: switching {cfg.objective} -> {cfg.switch_to} (weights and optimizer state kept, "
                f"lr continues at {lr_at(step, cfg):.2e})")
        t0 = time.perf_counter()
        try:
            loss, grad_norm = train_step(model, optimizer, loader.next_batch, cfg, vocab, step, grad_accum,
                                         generator, autocast, rank, world_size)
        except FloatingPointError as e:
            raise FloatingPointError(f"{e}; stopping. {last_good(ckpt_path, saved_step)}") from None
        dt = time.perf_counter() - t0
        step += 1
        tokens_seen += tokens_per_step
        causal = objective == "clm"
        flops = raw_model.flops_per_token(cfg.block_size, causal, 1.0 if causal else cfg.mask_ratio)
        record = {"step": step, "objective": objective, "loss": loss.item(), "lr": lr_at(step - 1, cfg),
                  "grad_norm": grad_norm.item(), "tokens": tokens_seen, "tokens_per_s": tokens_per_step / dt,
                  "mfu": flops * tokens_per_step / dt / peak}
        write(record)
        if bar:
            bar.update(1)
            bar.set_postfix_str(f"{objective} loss {record['loss']:.3f} lr {record['lr']:.1e} "
                                f"{record['tokens_per_s']:,.0f} tok/s")
        if (cfg.eval_interval and step % cfg.eval_interval == 0) or step in (cfg.max_steps, cfg.stop_at):
            val = run_eval()
            if bar:
                bar.write(f"step {step}: val clm {val['clm']:.4f} | val mlm {val['mlm']:.4f} ({objective} phase)")
            try:
                checkpoint(val)
            except FloatingPointError as e:
                raise FloatingPointError(f"{e}. {last_good(ckpt_path, saved_step)}") from None
            saved_step = step
    if bar:
        bar.close()

    elapsed = time.perf_counter() - t_start
    val = val or run_eval()
    if master:
        summary = {"steps": step, "max_steps": cfg.max_steps, "switch_step": switch, "tokens": tokens_seen,
                   "val_clm": val["clm"], "val_mlm": val["mlm"], "seconds": elapsed, "checkpoint": ckpt_path}
        files.write_text_atomically(os.path.join(cfg.out_dir, "summary.json"), json.dumps(files.strict(summary),
                                                                                            indent=1))
        done = "finished" if step == cfg.max_steps else f"stopped at step {step} (resume with --init_from=resume)"
        say(f"{done} in {elapsed:.0f}s: val clm {val['clm']:.4f} | val mlm {val['mlm']:.4f} | {ckpt_path}")
    if world_size > 1:
        dist.barrier()
        if device.type != "cpu":
            dist.destroy_process_group()
        else:
            # Tearing down gloo can deadlock: a gloo worker thread freeing the last collective's tensors waits for
            # the GIL while the main thread, holding it, waits for that worker (about 1 run in 6 here, barrier or
            # not). Everything is saved by now, so a CPU run of several processes leaves without destructors.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
