"""The device and the processes: one per GPU under torchrun (NCCL; gloo on CPUs), DDP or FSDP2,
bf16 autocast, peak FLOP/s for MFU, one checkpoint format for all. docs/huggingface.md#fsdp."""

import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

# dense bf16 tensor-core FLOP/s from the vendors' data sheets, by a substring of the device name
GPU_PEAK_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12,
                 "H100": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "A800": 312e12,
                 "L40S": 362e12, "L4": 121e12, "A10G": 125e12, "A10": 125e12, "RTX 4090": 165e12,
                 "RTX 3090": 71e12}
GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full, on rank 0's CPU

def peak_flops(device: torch.device) -> float:
    """Peak FLOP/s for MFU: a known GPU's data sheet; a CPU's measured (what its BLAS reaches)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in GPU_PEAK_BF16.items() if key in name), float("nan"))
    if device.type != "cpu":
        return float("nan")
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = float("inf")
    for _ in range(5):  # the best of several tries: other work only ever makes a try slower
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024 ** 3 * 4 / best

def device_and_autocast(device: str, dtype: str, local_rank: int = 0, world_size: int = 1):
    """Every script's device ("auto": cuda, mps, then cpu) and autocast factory (bf16 on CUDA)."""
    if device == "auto":
        device = ("cuda" if torch.cuda.is_available()
                  else "mps" if torch.backends.mps.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and (world_size > 1 or chosen.index is None):
        chosen = torch.device("cuda", local_rank)  # one GPU per process; set_device needs an index
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls outside autocast: TF32
        torch.backends.cudnn.allow_tf32 = True
    if dtype == "bfloat16" or (dtype == "auto" and chosen.type == "cuda"):
        return chosen, lambda: torch.autocast(device_type=chosen.type, dtype=torch.bfloat16)
    return chosen, nullcontext

def device_problem(device: str) -> str | None:
    """What is wrong with a --device setting on this machine, or None."""
    if device == "auto":
        return None
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()):
        return f"--device={device!r} must be auto, cpu, cuda, cuda:N or mps"
    if kind != "cpu" and not (torch.cuda if kind == "cuda" else torch.backends.mps).is_available():
        return (f"--device={device}: this machine or this torch build ({torch.__version__}) has "
                f"no {kind} device; use --device=auto")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        return f"--device={device}: there are {torch.cuda.device_count()} CUDA devices"
    return None

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

    @property
    def bf16(self) -> bool:
        return self.autocast is not nullcontext

    def print(self, text: str):
        if self.master:  # tqdm.write: above a progress bar, if one is drawn
            tqdm.write(text)

def setup(device: str, dtype: str) -> Process:
    """The device and rank of this process; joins the process group if torchrun started several."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    chosen, autocast = device_and_autocast(device, dtype, local_rank, world_size)
    if world_size > 1:
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return Process(chosen, autocast, rank, local_rank, world_size)

def shard(model: torch.nn.Module, bf16: bool) -> None:
    """FSDP2: a rank holds 1/world_size of weights, gradients and AdamW state plus the block that
    runs; the root (embedding, norm, head) stays gathered: objectives.py uses the head's weight."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        raise SystemExit(f"error: --fsdp needs torch >= 2.6, not {torch.__version__}") from None
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if bf16 else MixedPrecisionPolicy()
    for module in (*model.blocks, model):  # the blocks first, then the root
        fully_shard(module, mp_policy=policy)

def wrap(module: torch.nn.Module, proc: Process, compile: bool, sharded: bool) -> torch.nn.Module:
    """What the training step calls: DDP (unless sharded), then torch.compile, the order torch's
    DDPOptimizer expects (it cuts the graph at DDP's gradient buckets; FSDP2's hooks break it)."""
    if proc.world_size > 1 and not sharded:
        module = DDP(module, device_ids=[proc.local_rank] if proc.device.type == "cuda" else None)
    return torch.compile(module) if compile else module

def full_weights(model, sharded: bool) -> dict | None:
    """The full weights gathered to rank 0's CPU, every rank taking part; None if not sharded."""
    return get_model_state_dict(model, options=GATHERED) if sharded else None

def full_state(model, optimizer, sharded: bool) -> tuple[dict | None, dict]:
    """(full weights or None, full AdamW state); FSDP's gathered on rank 0's CPU: one ckpt.pt."""
    if not sharded:
        return None, optimizer.state_dict()
    return full_weights(model, True), get_optimizer_state_dict(model, optimizer, options=GATHERED)

def load_optimizer_state(model, optimizer, state: dict, sharded: bool) -> None:
    """AdamW's moments and step counts from a checkpoint; hyperparameters stay this run's (CPT)."""
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
    # Tearing down gloo can deadlock (about 1 run in 6): a gloo thread freeing the last collective's
    # tensors waits for the GIL, held by the main thread waiting for it. All is saved: leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
