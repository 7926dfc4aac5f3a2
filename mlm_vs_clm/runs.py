"""A pretraining run's start (scratch, resume, continued pretraining, Hugging Face), checkpoints
and log, for train.py's loop. docs/pretraining.md."""

import math
import os
import sys
import time
import uuid
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
from tqdm import tqdm

from data import BlockLoader, data_dir_of, load_meta, prepare
from mlm_vs_clm import files, parallel
from mlm_vs_clm.checkpoints import (checkpoint_payload, identity, load_model, model_from_checkpoint,
                                    read_checkpoint, save_checkpoint)
from mlm_vs_clm.settings import Interrupted, explicit_keys, optional
from mlm_vs_clm.tokenizer import TOKENIZER_FIELDS, check_tokenizer, get_tokenizer
from model import Transformer, configure_optimizer, model_config
from objectives import PretrainingLoss, Vocab, switch_step

@dataclass
class TokenFiles:
    dir: str
    vocab: Vocab
    tokenizer: dict  # what every checkpoint records of it (TOKENIZER_FIELDS)
    identity: str  # what the files are: their source, its versions, a hash of the tokens

def open_token_files(cfg, proc: parallel.Process) -> TokenFiles:
    """Prepared once (by one process), then memory-mapped by all."""
    data_dir = data_dir_of(asdict(cfg))
    if proc.master:  # a no-op when prepared; of two runs starting at once, one waits
        prepare(cfg.data, data_dir, cfg.tokenizer, max_tokens=cfg.data_tokens or None, reuse=True)
    parallel.barrier(proc)
    meta = load_meta(data_dir)
    tokenizer = {k: meta.get(k) for k in TOKENIZER_FIELDS}
    # meta.json is a file like any other: its vocabulary must be the named tokenizer's
    tok = get_tokenizer(cfg.tokenizer)
    check_tokenizer(tokenizer, tok.meta(), f"--tokenizer={cfg.tokenizer}",
                    os.path.join(data_dir, "meta.json"))
    versions = " ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
    digest = meta["tokens_sha256"][:8] if "tokens_sha256" in meta else "not hashed (old files)"
    identity = f"{meta['source']}{f' ({versions})' if versions else ''}, tokens {digest}"
    return TokenFiles(data_dir, tok.vocab(), tokenizer, identity)

# What a resumed run may change: how it is watched and run; the rest decides what is trained
RESUME_FREE = {"eval_interval", "eval_batches", "log_interval", "keep_checkpoints", "stop_at",
               "progress", "wandb_project", "wandb_run", "device", "dtype", "compile", "fsdp",
               "attention", "sparse_head", "repeat_data", "data_dir", "init_from", "out_dir",
               "load_optimizer", "max_steps", "batch_size", "total_batch_size", "switch_at"}

def resume_settings(cfg, argv: list[str], world_size: int):
    """The settings and the checkpoint --init_from=resume continues, refusing what it trained."""
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.init_from != "resume":
        if os.path.exists(ckpt_path):
            raise SystemExit(f"error: {ckpt_path} exists: --init_from=resume, or another --out_dir")
        return cfg, None
    if not os.path.exists(ckpt_path):
        raise FileNotFoundError(f"--init_from=resume: no {ckpt_path} (the run wrote none yet): "
                                "start it again without --init_from=resume")
    resumed = read_checkpoint(ckpt_path)
    if "optimizer" not in resumed or "train_config" not in resumed:
        raise ValueError(f"{ckpt_path} holds weights only (a kept ckpt_<step>.pt?): fine-tune or "
                         "export it, or start from it: --init_from=PATH --load_optimizer=false")
    saved, names = resumed["train_config"], {f.name for f in fields(cfg)}
    if unknown := sorted(set(saved) - names):
        raise ValueError(f"{ckpt_path} holds settings this code does not know ({unknown}): it "
                         "was written by another version of the project")
    given = explicit_keys(argv) - {"init_from"}
    if changed := sorted(k for k in given - RESUME_FREE if getattr(cfg, k) != saved.get(k)):
        was = ", ".join(f"--{k}={saved.get(k)!r}" for k in changed)
        raise ValueError(f"--init_from=resume continues the run as it was trained ({was}): drop "
                         f"--{' --'.join(changed)}, or start a new run in another --out_dir")
    merged = type(cfg)(**{**asdict(cfg), **{k: v for k, v in saved.items()
                                            if k not in given and k != "stop_at"}})
    check_extension(merged, type(cfg)(**saved), resumed, world_size, ckpt_path)
    return merged, resumed

def check_extension(now, then, resumed: dict, world_size: int, path: str) -> None:
    """The same global batch; a longer budget moves neither the switch nor a trained step's lr."""
    step, batch = resumed["step"], resumed.get("global_batch")
    if batch is not None and (now.total_batch_size or now.batch_size * world_size) != batch:
        raise ValueError(f"{path} was trained with {batch} sequences a step; --batch_size x "
                         f"processes, or --total_batch_size, must give the same")
    old = switch_step(then.switch_to, then.switch_at, then.max_steps)
    new = switch_step(now.switch_to, now.switch_at, now.max_steps)
    if new != old:
        raise ValueError(f"--max_steps={now.max_steps} --switch_at={now.switch_at:g} would move "
                         f"the switch of {path} from step {old} to {new}: give --switch_at={old}")
    if now.max_steps == then.max_steps:
        return
    if now.max_steps < step or step > then.max_steps - then.decay_steps:
        raise ValueError(f"--max_steps={now.max_steps} would cut steps {path} trained (it is at "
                         f"step {step} of {then.max_steps}) or move a decay already begun")
    print(f"extending the run from {then.max_steps} to {now.max_steps} steps"
          + (f"; the switch stays at step {old}" if old is not None else ""))

class Origin(NamedTuple):
    step: int = 0
    loader_state: dict | None = None
    optimizer_state: dict | None = None
    source: str = ""  # the checkpoint it comes from, for messages
    source_id: str | None = None  # that checkpoint's identity (checkpoints.identity)

def build_model(cfg, token_files: TokenFiles, resumed: dict | None) -> tuple[Transformer, Origin]:
    """The model, and where the run starts (Origin)."""
    torch.manual_seed(cfg.seed)
    meta_path, origin = os.path.join(token_files.dir, "meta.json"), Origin()
    if resumed is not None:
        ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
        model = model_from_checkpoint(resumed, ckpt_path)
        check_tokenizer(token_files.tokenizer, resumed["tokenizer"], ckpt_path, meta_path)
        origin = Origin(resumed["step"], loader_state(resumed), resumed["optimizer"], ckpt_path,
                        resumed.get("source_id"))
    elif cfg.init_from == "scratch":
        model = Transformer(model_config(cfg.model, vocab_size=token_files.vocab.size,
                                         block_size=cfg.block_size))
    else:  # another run's checkpoint, or hf:DIR
        model, tok, source = load_model(cfg.init_from)
        check_tokenizer(token_files.tokenizer, tok.meta(), cfg.init_from, meta_path)
        origin = continued_pretraining(cfg, token_files, source) if source else Origin()
        origin = origin._replace(source_id=identity(cfg.init_from, source))
    if model.config.block_size < cfg.block_size:
        raise ValueError(f"{cfg.init_from}: its block_size {model.config.block_size} is below "
                         f"--block_size={cfg.block_size}")
    model.config.attention = cfg.attention  # how attention is computed is not part of the weights
    return model, origin

def continued_pretraining(cfg, token_files: TokenFiles, source: dict) -> Origin:
    """Besides the weights: on the same data, the stream where it stopped (the paper's CPT reads
    steps 42k-64k of one stream), and AdamW's moments, as the authors' trainer. config/cpt.py."""
    saved = source.get("train_config", {})
    same_stream = (os.path.realpath(data_dir_of(saved)) == os.path.realpath(token_files.dir)
                   and loader_state(source) and saved.get("seed") == cfg.seed
                   and saved.get("block_size") == cfg.block_size)
    optimizer = source.get("optimizer") if cfg.load_optimizer else None
    if cfg.load_optimizer and optimizer is None:
        raise ValueError(f"{cfg.init_from} holds no optimizer state (weights only?): add "
                         "--load_optimizer=false to start AdamW empty")
    sharded = bool(saved.get("fsdp"))
    if optimizer is not None and sharded != cfg.fsdp:
        raise ValueError(f"{cfg.init_from}: its AdamW state is laid out for fsdp={sharded}: run "
                         f"with --fsdp={str(sharded).lower()} or --load_optimizer=false")
    return Origin(0, loader_state(source) if same_stream else None, optimizer, cfg.init_from)

def loader_state(ckpt: dict) -> dict | None:
    return ckpt.get("loader", ckpt.get("data"))  # "data": checkpoints written before 2026-12

def check_unique_blocks(loader: BlockLoader, steps_left: int, per_step: int, allowed: bool):
    """The paper's control: every model sees the same blocks once, in the same order."""
    if steps_left * per_step > (left := loader.n_blocks - loader.position) and not allowed:
        raise ValueError(f"{loader.path}: from block {loader.position:,} of {loader.n_blocks:,} "
                         f"it fits {left // per_step:,} steps of {per_step} sequences, not the "
                         f"{steps_left:,} asked, which would read blocks twice: prepare more "
                         "(--data_tokens), run fewer steps, or --repeat_data=true")

@dataclass
class Run:
    cfg: object  # train.TrainConfig
    proc: parallel.Process
    token_files: TokenFiles
    raw_model: Transformer  # the weights, which the optimizer and the checkpoints see
    loss: torch.nn.Module  # what the step calls: raw_model and its loss, in DDP and/or compiled
    optimizer: torch.optim.Optimizer
    loader: BlockLoader
    grad_accum: int  # micro-batches per step on each process
    lock: ExitStack  # holds the out_dir: a second run would interleave the log, race on ckpt.pt
    run_id: str  # in every checkpoint of the run: what identifies them wherever they are copied
    source_id: str | None  # the identity of the checkpoint it continues (pretraining from it)
    step: int = 0  # optimizer steps done
    objective: str | None = None  # the objective of the last step done
    saved_step: int | None = None  # the step of ckpt.pt, the last good checkpoint

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.cfg.out_dir, "ckpt.pt")

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        self.lock.close()
        if kind is KeyboardInterrupt:
            raise Interrupted(f"training stopped at step {self.step}. {self.last_good()}") from None

    @property
    def tokens_per_step(self) -> int:
        return self.grad_accum * self.cfg.batch_size * self.proc.world_size * self.cfg.block_size

    @property
    def switch(self) -> int | None:
        return switch_step(self.cfg.switch_to, self.cfg.switch_at, self.cfg.max_steps)

    def payload(self, weights: dict | None, **extra) -> dict:
        return checkpoint_payload(self.raw_model, weights, step=self.step, run_id=self.run_id,
                                  source_id=self.source_id, tokenizer=self.token_files.tokenizer,
                                  global_batch=self.tokens_per_step // self.cfg.block_size,
                                  train_config=asdict(self.cfg), loader=self.loader.state_dict(),
                                  objective=self.objective, **extra)

    def save(self, val: dict):
        weights, state = parallel.full_state(self.raw_model, self.optimizer, self.cfg.fsdp)
        if self.proc.master:
            try:
                save_checkpoint(self.payload(weights, optimizer=state, val=val), self.ckpt_path)
            except FloatingPointError as e:
                raise FloatingPointError(f"{e}. {self.last_good()}") from None
        self.saved_step = self.step

    def keep(self):
        """ckpt_<step>.pt: the weights alone, for fine-tuning and export."""
        weights = parallel.full_weights(self.raw_model, self.cfg.fsdp)
        if self.proc.master:
            save_checkpoint(self.payload(weights),
                            os.path.join(self.cfg.out_dir, f"ckpt_{self.step}.pt"))

    def last_good(self) -> str:
        if self.saved_step is None:
            return f"No checkpoint of this run was written yet ({self.ckpt_path} does not exist)"
        return (f"The last good checkpoint is {self.ckpt_path} (step {self.saved_step}): resume "
                "from it with --init_from=resume")

    def describe(self) -> str:
        cfg, params, switch = self.cfg, self.raw_model.num_params(), self.switch
        name = cfg.model if cfg.init_from in ("scratch", "resume") else cfg.init_from
        per_step = self.grad_accum * cfg.batch_size * self.proc.world_size
        return (f"model {name}: {params['paper'] / 1e6:.2f}M parameters (body + embedding; "
                f"{params['total'] / 1e6:.2f}M in all) | {self.proc.world_size} process(es) on "
                f"{self.proc.device} | {per_step} x {cfg.block_size} tokens per step "
                f"({self.grad_accum} micro-batch(es) of {cfg.batch_size} each) | {cfg.objective} "
                + (f"until step {switch}, then {cfg.switch_to}" if switch is not None else "only")
                + f" | {cfg.max_steps} steps | data {self.token_files.identity}")

def start(cfg, proc: parallel.Process, resumed: dict | None) -> Run:
    """The run at step 0 or where its checkpoint stopped, holding its out_dir until it ends."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    lock = ExitStack()
    try:
        if proc.master:
            lock.enter_context(files.exclusive(cfg.out_dir, f"training in {cfg.out_dir}"))
        token_files = open_token_files(cfg, proc)
        raw_model, origin = build_model(cfg, token_files, resumed)
        raw_model.to(proc.device)
        if cfg.fsdp:
            parallel.shard(raw_model, proc.bf16)
        optimizer = configure_optimizer(raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                        cfg.adam_eps)
        loader = BlockLoader(token_files.dir, "train", cfg.block_size, cfg.batch_size,
                             seed=cfg.seed, rank=proc.rank, world_size=proc.world_size,
                             device=proc.device)
        if origin.optimizer_state is not None:
            parallel.load_optimizer_state(raw_model, optimizer, origin.optimizer_state, cfg.fsdp)
        if origin.loader_state is not None:
            loader.load_state_dict(origin.loader_state)
        if resumed is not None:
            proc.print(f"resuming {origin.source} at step {origin.step}")
        elif origin.source:
            adamw = "carried over" if origin.optimizer_state is not None else "empty"
            data = f"at block {loader.position:,}" if origin.loader_state else "from the start"
            proc.print(f"continuing from {origin.source}: AdamW state {adamw}, data stream {data}")
        compile = cfg.compile == "true" or (cfg.compile == "auto" and proc.device.type == "cuda")
        loss = parallel.wrap(PretrainingLoss(raw_model, token_files.vocab, cfg.mask_ratio,
                                             cfg.mask_replace, cfg.sparse_head),
                             proc, compile, sharded=cfg.fsdp)
        per_step = cfg.total_batch_size or cfg.batch_size * proc.world_size  # sequences
        if per_step % (cfg.batch_size * proc.world_size):
            raise ValueError(f"--total_batch_size={per_step} is not a multiple of --batch_size x "
                             f"processes = {cfg.batch_size} x {proc.world_size}")
        grad_accum = per_step // (cfg.batch_size * proc.world_size)
        check_unique_blocks(loader, cfg.max_steps - origin.step, per_step, cfg.repeat_data)
        run_id = (resumed or {}).get("run_id") or uuid.uuid4().hex[:12]
        return Run(cfg, proc, token_files, raw_model, loss, optimizer, loader, grad_accum, lock,
                   run_id, origin.source_id, origin.step, resumed and resumed.get("objective"),
                   saved_step=origin.step if resumed is not None else None)
    except BaseException:
        lock.close()
        raise

def write_summary(run: Run, val: dict, tokens: int, seconds: float):
    cfg = run.cfg
    summary = {"steps": run.step, "max_steps": cfg.max_steps, "switch_step": run.switch,
               "tokens": tokens, "val_clm": val["clm"], "val_mlm": val["mlm"],
               "seconds": seconds, "checkpoint": run.ckpt_path}
    files.write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    done = ("finished" if run.step == cfg.max_steps
            else f"stopped at step {run.step} (resume with --init_from=resume)")
    run.proc.print(f"{done} in {seconds:.0f}s: val clm {val['clm']:.4f} | val mlm "
                   f"{val['mlm']:.4f} | {run.ckpt_path}")

class RunLog:
    """log.jsonl, lines, W&B: every rank checks each step, rank 0 writes; resume keeps the past."""

    def __init__(self, run: Run):
        self.run, cfg, self.pending = run, run.cfg, []
        self.peak = parallel.peak_flops(run.proc.device) * run.proc.world_size
        self.t_last, self.file, self.wandb, self.bar = time.perf_counter(), None, None, None
        if not run.proc.master:
            return
        path = os.path.join(cfg.out_dir, "log.jsonl")
        records = files.read_json_lines(path) if run.saved_step is not None else []
        kept = [r for r in records if r.get("step", math.inf) <= run.saved_step]
        files.write_text_atomically(path, "".join(files.json_line(r) for r in kept))
        self.file = open(path, "a", encoding="utf-8")
        if cfg.progress and sys.stderr.isatty():
            self.bar = tqdm(total=cfg.max_steps, initial=run.step, dynamic_ncols=True)
        if cfg.wandb_project:
            wandb = optional("wandb", "--wandb_project")
            try:
                self.wandb = wandb.init(project=cfg.wandb_project, dir=cfg.out_dir,
                                        name=cfg.wandb_run or os.path.basename(cfg.out_dir),
                                        config={**asdict(cfg), "switch_step": run.switch})
            except Exception as e:  # no login, no network: one line with both cures
                why = str(e).splitlines()[0][:100]
                raise ValueError(f"--wandb_project: wandb could not start ({why}): `wandb login`, "
                                 "or WANDB_MODE=offline") from None

    def add(self, loss, grad_norm, lr: float):
        run = self.run
        self.pending.append((run.step, run.objective, lr, torch.stack([loss, grad_norm.float()])))

    def flush(self):
        """The loop's one host sync: each pending loss becomes a record; a non-finite one stops."""
        if not self.pending:
            return
        run, cfg = self.run, self.run.cfg
        values = torch.stack([p[3] for p in self.pending]).tolist()
        seconds, self.t_last = time.perf_counter() - self.t_last, time.perf_counter()
        tokens_per_s = run.tokens_per_step * len(self.pending) / seconds
        for (step, objective, lr, _), (loss, grad_norm) in zip(self.pending, values):
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise FloatingPointError(
                    f"step {step} ({objective}) has loss {loss:.4g} and gradient norm "
                    f"{grad_norm:.4g}; its update was not applied; stopping. {run.last_good()}")
            causal = objective == "clm"
            flops = run.raw_model.flops_per_token(cfg.block_size, causal,
                                                  1.0 if causal else cfg.mask_ratio)
            self.write({"step": step, "objective": objective, "loss": loss, "lr": lr,
                        "grad_norm": grad_norm, "tokens": step * run.tokens_per_step,
                        "tokens_per_s": tokens_per_s, "mfu": flops * tokens_per_s / self.peak})
        self.pending.clear()
        line = f"{objective} loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s"
        if self.bar:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(line)
        else:
            run.proc.print(f"step {step}: {line} | mfu {flops * tokens_per_s / self.peak:.1%}")

    def restart_clock(self):
        self.t_last = time.perf_counter()  # tokens/s counts training steps only

    def write(self, record: dict):
        if not self.file:
            return
        self.file.write(files.json_line(record))
        self.file.flush()
        if self.wandb:  # a NaN or an infinity (an unknown GPU's MFU) is left out, as null in JSON
            self.wandb.log({k: v for k, v in record.items() if k != "step" and not
                            (isinstance(v, float) and not math.isfinite(v))}, step=record["step"])

    def close(self):
        if self.bar:
            self.bar.close()
        if self.file:
            self.file.close()
        if self.wandb:
            self.wandb.finish()
