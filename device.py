"""
The device every script runs on, its autocast, and its peak FLOP/s for MFU: one choice for
train.py, finetune.py and bench.py.

    --device=auto   cuda, then mps, then cpu; under torchrun each process takes its local rank's GPU
    --dtype=auto    bfloat16 autocast on CUDA (the paper's), float32 elsewhere
"""

import time
from contextlib import nullcontext

import torch


# dense bf16 tensor-core FLOP/s from the vendors' data sheets, by a substring of the device name
GPU_PEAK_BF16 = {
    "H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
    "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L4": 121e12,
    "A10G": 125e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12,
}


def peak_flops(device: torch.device) -> float:
    """Peak FLOP/s of one device, for MFU: the data-sheet figure for known GPUs; on a CPU, measured
    with a large float32 matmul (so CPU MFU is against what this machine's BLAS really reaches)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in GPU_PEAK_BF16.items() if key in name), float("nan"))
    if device.type != "cpu":
        return float("nan")
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = float("inf")
    # the best of several tries: other work on the machine only ever makes a try slower
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024 ** 3 * 4 / best


def device_and_autocast(device: str, dtype: str, local_rank: int = 0, world_size: int = 1):
    """The torch device of a --device setting ("auto": cuda, then mps, then cpu; under torchrun
    each process takes the GPU of its local rank) and an autocast factory for a --dtype setting
    ("auto": bfloat16 on CUDA, float32 elsewhere). train.py, finetune.py and bench.py all choose
    their device here."""
    if device == "auto":
        kind = ("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available()
                else "cpu")
    else:
        kind = device.split(":")[0]
    chosen = torch.device(device if device != "auto" else kind)
    if chosen.type == "cuda" and (world_size > 1 or chosen.index is None):
        # one GPU per torchrun process; set_device needs an index
        chosen = torch.device("cuda", local_rank)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
        # float32 matmuls outside autocast on tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if (dtype if dtype != "auto"
            else "bfloat16" if chosen.type == "cuda" else "float32") == "bfloat16":
        return chosen, lambda: torch.autocast(device_type=chosen.type, dtype=torch.bfloat16)
    return chosen, nullcontext
