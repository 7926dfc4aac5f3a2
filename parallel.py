"""
Several processes, one per GPU, under torchrun: what train.py needs of torch.distributed, kept apart
so that the training script reads as the paper's recipe. Nothing here is specific to the paper:

- `start`: this process's device and rank; joins the process group under torchrun (NCCL on GPUs,
  gloo on CPUs).
- `shard`: FSDP2, before the optimizer is built; `wrap`: torch.compile, then DDP (unless sharded).
- `full_state` / `load_optimizer_state`: one checkpoint format for every run, sharded or not.
- `finish`: leave the process group without the gloo teardown deadlock.
"""

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP

from device import device_and_autocast


@dataclass
class Process:
    """This process's place among torchrun's processes. Rank 0 alone writes files and prints."""
    device: torch.device
    autocast: Callable  # a context-manager factory: bf16 autocast, or nullcontext
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def start(device: str, dtype: str) -> Process:
    """The device and rank of this process;
    joins the process group when torchrun started several."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    chosen, autocast = device_and_autocast(device, dtype, local_rank, world_size)
    if world_size > 1:
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return Process(chosen, autocast, rank, local_rank, world_size)


def shard(model: torch.nn.Module) -> None:
    """FSDP2: each block is one unit whose weights are all-gathered just before it runs and freed
    after, so a rank holds 1/world_size of the weights, gradients and AdamW state plus one block in
    full. The root unit holds the rest (embedding, final norm, LM head) and stays gathered after its
    forward, which is what lets objectives.py call the LM head outside forward(); the gradients it
    gets there are reduce-scattered at the end of backward like the others."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise SystemExit(f"error: --fsdp needs FSDP2, in torch >= 2.6 (this is "
                         f"{torch.__version__})") from None
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)


def wrap(model: torch.nn.Module, proc: Process, compile: bool, sharded: bool) -> torch.nn.Module:
    """The module the training step calls: compiled and/or in DDP. The unwrapped one keeps the
    weights, for the optimizer and the checkpoints."""
    if compile:
        model = torch.compile(model)
    if proc.world_size > 1 and not sharded:
        model = DDP(model, device_ids=[proc.local_rank] if proc.device.type == "cuda" else None)
    return model


def full_weights(model, sharded: bool) -> dict | None:
    """The full weights, or None where model.state_dict() already holds them (not sharded). Under
    FSDP they are gathered to rank 0's CPU, and every rank must take part."""
    if not sharded:
        return None
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def full_state(model, optimizer, sharded: bool) -> tuple[dict | None, dict]:
    """(full weights or None, full optimizer state). Under FSDP the full state is gathered to rank
    0 and saved in the usual ckpt.pt: one format for every run, which export, fine-tuning and a
    resume with any world size read. It costs rank 0 CPU memory for a full copy (16 bytes a
    parameter with AdamW); sharded DCP files would not, but would need a second format everywhere
    else."""
    if not sharded:
        return None, optimizer.state_dict()
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return full_weights(model, sharded), get_optimizer_state_dict(model, optimizer, options=full)


def load_optimizer_state(model, optimizer, state: dict, sharded: bool) -> None:
    """AdamW's moments and step counts from a checkpoint. The hyperparameters (betas, eps, weight
    decay) stay this run's: a continued pretraining run may set its own."""
    own = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    if sharded:  # a full (gathered) state, keyed by parameter name: each rank keeps its shard
        set_optimizer_state_dict(model, optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, own):
        group.update(settings)


def barrier(proc: Process) -> None:
    if proc.world_size > 1:
        dist.barrier()


def finish(proc: Process) -> None:
    """Leave the process group once every process is done."""
    if proc.world_size == 1:
        return
    dist.barrier()
    if proc.device.type != "cpu":
        dist.destroy_process_group()
        return
    # Tearing down gloo can deadlock: a gloo worker thread freeing the last collective's tensors
    # waits for the GIL while the main thread, holding it, waits for that worker (about 1 run in 6
    # here, barrier or not). Everything is saved by now, so a CPU run of several processes leaves
    # without destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
