"""
Where a pretraining run starts: its data, its model and its step. From scratch; resumed from its
own checkpoint; continued from another run's checkpoint (the paper's continued pretraining, CPT);
or from a Hugging Face checkpoint. train.py calls these in order; what each takes from its origin
is written next to it.
"""

import os
from dataclasses import asdict, dataclass

import torch

import parallel
from checkpoints import load_checkpoint, model_from_checkpoint
from data import TOKENIZER_FIELDS, check_tokenizer, data_dir_of, get_tokenizer, load_meta, prepare
from hf import load_hf
from model import Transformer, model_config
from objectives import Vocab


@dataclass
class Data:
    """A run's prepared token files, and what the objectives need to know of their tokenizer."""
    dir: str
    vocab: Vocab
    tokenizer: dict  # the description every checkpoint carries (data.TOKENIZER_FIELDS)


def open_data(cfg, proc: parallel.Process) -> Data:
    """The run's token files: prepared once (by one process), then memory-mapped by all."""
    data_dir = data_dir_of(asdict(cfg))
    # a no-op when prepared; when two runs start at once, one prepares, the other waits
    if proc.master:
        prepare(cfg.data, data_dir, cfg.tokenizer, max_tokens=cfg.data_tokens or None, reuse=True)
    parallel.barrier(proc)
    meta = load_meta(data_dir)
    tokenizer = {k: meta.get(k) for k in TOKENIZER_FIELDS}
    # meta.json is a file like any other:
    # its vocabulary and special ids must be the named tokenizer's
    check_tokenizer(tokenizer, get_tokenizer(cfg.tokenizer).meta(), f"--tokenizer={cfg.tokenizer}",
                    os.path.join(data_dir, "meta.json"))
    vocab = Vocab(meta["n_vocab"], meta["mask_id"],
                  (meta["eot_id"], meta["mask_id"], meta["pad_id"]), meta["pad_id"])
    return Data(data_dir, vocab, tokenizer)


@dataclass
class Origin:
    """Where a run starts, besides its weights: a step, a data position, an AdamW state."""
    step: int = 0
    data: dict | None = None  # the loader state to continue from
    optimizer: dict | None = None  # the AdamW state to start from
    optimizer_sharded: bool = False  # saved by an FSDP run: keyed by parameter name
    source: str = ""  # the checkpoint it comes from, for messages


def build_model(cfg, data: Data, resumed: dict | None) -> tuple[Transformer, Origin]:
    """The model, from scratch, from this run's checkpoint, from another run's (continued
    pretraining) or from a Hugging Face checkpoint; and where the run starts."""
    torch.manual_seed(cfg.seed)
    meta_path, origin = os.path.join(data.dir, "meta.json"), Origin()
    if resumed is not None:
        ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
        model = model_from_checkpoint(resumed, ckpt_path)
        check_tokenizer(data.tokenizer, resumed["tokenizer"], ckpt_path, meta_path)
        origin = Origin(resumed["step"], resumed["data"], resumed["optimizer"], cfg.fsdp, ckpt_path)
    elif cfg.init_from.startswith("hf:"):
        model = load_hf(cfg.init_from.removeprefix("hf:"), get_tokenizer(cfg.tokenizer))
    elif cfg.init_from != "scratch":
        model, source = load_checkpoint(cfg.init_from)
        check_tokenizer(data.tokenizer, source["tokenizer"], cfg.init_from, meta_path)
        origin = continued_pretraining(cfg, data, source)
    else:
        model = Transformer(model_config(cfg.model, vocab_size=data.vocab.size,
                                         block_size=cfg.block_size))
    if model.config.block_size < cfg.block_size:
        raise SystemExit(f"error: the checkpoint's block_size {model.config.block_size} < "
                         f"{cfg.block_size}")
    model.config.attention = cfg.attention  # how attention is computed is not part of the weights
    return model, origin


def continued_pretraining(cfg, data: Data, source: dict) -> Origin:
    """What a run started from another run's checkpoint takes from it besides the weights.
    - The data: on the data its source was trained on, it reads on from where that run stopped,
      so its steps see new blocks, as the paper's CPT (steps 42k-64k of one data stream) does.
    - The AdamW moments (load_optimizer, default): the authors' training code reloads the
      optimizer state whenever it restarts from a checkpoint, and has no switch to skip it.
    The learning rate is this run's own warmup-stable-decay schedule over its max_steps: the
    source ended its decay at 0, so a new warmup is needed (config/cpt.py sets the paper's CPT)."""
    saved = source.get("train_config", {})
    same_stream = (os.path.realpath(data_dir_of(saved)) == os.path.realpath(data.dir)
                   and "data" in source and saved.get("seed") == cfg.seed
                   and saved.get("block_size") == cfg.block_size)
    optimizer = source.get("optimizer") if cfg.load_optimizer else None
    if cfg.load_optimizer and optimizer is None:
        raise ValueError(f"{cfg.init_from} holds no optimizer state (a kept weights-only "
                         "checkpoint?): add --load_optimizer=false to start AdamW empty")
    sharded = bool(saved.get("fsdp"))
    if optimizer is not None and sharded != cfg.fsdp:
        raise ValueError(f"{cfg.init_from} was written by a run with fsdp={sharded}, and its AdamW "
                         f"state is laid out for it: run with --fsdp={str(sharded).lower()} or "
                         "--load_optimizer=false")
    return Origin(0, source["data"] if same_stream else None, optimizer, sharded, cfg.init_from)


def check_unique_data(loader, max_steps: int, step: int, per_step: int, allowed: bool):
    """The paper's control: every model sees the same unique ordered blocks. A run that would
    read a block a second time stops before its first step unless told that this is intended
    (repeat_data)."""
    left = loader.n_blocks - loader.position  # blocks this run has not read yet
    wanted = (max_steps - step) * per_step
    if wanted > left and not allowed:
        raise ValueError(f"{loader.path} holds {loader.n_blocks:,} blocks of {loader.block_size} "
                         f"tokens; from block {loader.position:,} they fit {left // per_step:,} "
                         f"steps of {per_step} sequences, but this run asks for "
                         f"{max_steps - step:,}, so it would read blocks a second time: prepare "
                         "more data (--data_tokens), run fewer steps, or set --repeat_data=true "
                         "if repetition is intended")
