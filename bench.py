"""
Measure the training step: milliseconds per step, tokens/s, model FLOPs utilisation and peak memory,
with side-by-side comparisons run in one process so that each one is a ratio on the same machine.

    python bench.py                       # the tiny preset on this machine, every comparison
    python bench.py --model=210m --block_size=2048 --batch_size=8 --tokenizer=cl100k
                                          # one paper preset
    python bench.py --scaling=true        # also: how speed and memory grow with size and context
    python bench.py --suite=gpu --out=bench_gpu.md
                                          # the fixed GPU suite for the README (Hopper, < 8 minutes)
    python bench.py --json=true           # one JSON object per line, for machines
    python bench.py --profile=trace.json  # a torch.profiler trace of a few steps (chrome://tracing)

Every timed step is train.py's `train_step`: the same forward, loss, backward, gradient
scaling, clipping and AdamW update, not a copy. Batches are random token ids made on the device
once, so the step is timed alone; the data loader is timed on its own (the "loader" comparison)
against the step rate.

MFU = model FLOPs per token (model.py's `flops_per_token`: 6 per weight a token meets, attention's
T x T matmuls halved when causal, the MLM head counted on the masked share only) x tokens/s / peak
FLOP/s (data sheet for known GPUs in bf16, a measured float32 matmul on a CPU).
"""

import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from data import BlockLoader, write_tokens
from mlm_vs_clm.parallel import Process, device_and_autocast, peak_flops
from mlm_vs_clm.settings import configure
from mlm_vs_clm.tokenizer import get_tokenizer
from model import Transformer, configure_optimizer, model_config
from objectives import Vocab
from train import TrainConfig, train_step


@dataclass
class BenchConfig:
    model: str = "tiny"  # model.py preset for the comparisons
    block_size: int = 128  # tokens per sequence
    batch_size: int = 16  # sequences per step
    tokenizer: str = "cl100k_8k"  # vocab size and special ids come from it (paper presets: cl100k)
    steps: int = 10  # timed steps per row
    warmup: int = 3  # untimed steps before (compilation, allocator, caches)
    compare: str = "objective,head,attention,compile,loader"  # comparisons to run; "" = none
    scaling: bool = False  # also the scaling table over scaling_models x scaling_contexts
    scaling_models: str = "test,tiny"  # presets of the scaling table
    scaling_contexts: str = "64,128,256"  # context lengths of the scaling table
    suite: str = ""  # "gpu": the fixed GPU suite of the README (overrides the settings above)
    device: str = "auto"  # "auto" (cuda, then mps, then cpu) or a torch device string
    compile: str = "auto"  # compile rows that do not compare it: "auto" (on CUDA), "true", "false"
    json: bool = False  # print one JSON object per row instead of tables
    out: str = ""  # also write the report to this file
    profile: str = ""  # torch.profiler chrome trace of a few steps of the first row to this file


@dataclass
class Row:
    """One configuration to time."""
    name: str
    model: str
    objective: str = "clm"
    block_size: int = 128
    batch_size: int = 16
    attention: str = "sdpa"
    sparse_head: bool = True
    compiled: bool = False


def measure(row: Row, vocab: Vocab, device, autocast, cfg: BenchConfig, peak: float,
            profile: str = "") -> dict:
    """Time train_step for one row; returns its measurements (or the error, e.g. out of memory)."""
    torch.manual_seed(0)
    model = Transformer(model_config(row.model, vocab_size=vocab.size, block_size=row.block_size,
                                     attention=row.attention)).to(device)
    optimizer = configure_optimizer(model, 1e-4, device_type=device.type)
    stepped = torch.compile(model) if row.compiled else model
    train_cfg = TrainConfig(objective=row.objective, switch_to="none", sparse_head=row.sparse_head,
                            max_steps=10**9, warmup_steps=0, decay_steps=0, lr=1e-4)
    n_ordinary = vocab.size - len(vocab.special_ids)
    tokens = torch.randint(0, n_ordinary, (row.batch_size, row.block_size), device=device)
    generator = torch.Generator(device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    try:
        for i in range(cfg.warmup + cfg.steps):
            t0 = time.perf_counter()
            train_step(stepped, optimizer, lambda: tokens, row.objective, 1e-4, i, train_cfg,
                       vocab, 1, generator, Process(device, autocast))
            # train_step ends on a host sync: the GPU work is done
            times.append(time.perf_counter() - t0)
        if profile:
            from torch.profiler import ProfilerActivity, profile as profiler
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                                   else [])
            with profiler(activities=activities) as prof:
                for i in range(3):
                    train_step(stepped, optimizer, lambda: tokens, row.objective, 1e-4, i,
                               train_cfg, vocab, 1, generator, Process(device, autocast))
            prof.export_chrome_trace(profile)
    except torch.OutOfMemoryError:
        return {**row.__dict__, "error": "out of memory"}
    ms = statistics.median(times[cfg.warmup:]) * 1000
    tokens_per_step = row.batch_size * row.block_size
    causal = row.objective == "clm"
    # The work the step needs:
    # a dense MLM head does more for the same loss, and that excess does not count.
    flops = model.flops_per_token(row.block_size, causal, 1.0 if causal else train_cfg.mask_ratio)
    tok_s = tokens_per_step / (ms / 1000)
    return {**row.__dict__, "ms_per_step": ms, "tokens_per_s": tok_s, "mfu": flops * tok_s / peak,
            "peak_mem_gb": (torch.cuda.max_memory_allocated(device) / 2**30
                            if device.type == "cuda" else None)}


def measure_loader(cfg: BenchConfig, tokenizer_meta: dict, device, n_batches: int = 200) -> dict:
    """Batches per second of the real BlockLoader (memory-mapped file, random block order) on a
    synthetic token file large enough that the blocks come from all over it."""
    n_tokens = max(4 * n_batches * cfg.batch_size * cfg.block_size, 1 << 20)
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        write_tokens(tmp, {"train": rng.integers(0, 1000, n_tokens),
                           "val": rng.integers(0, 1000, cfg.block_size)},
                     tokenizer_meta, "synthetic")
        loader = BlockLoader(tmp, "train", cfg.block_size, cfg.batch_size, device=device)
        loader.next_batch()
        t0 = time.perf_counter()
        for _ in range(n_batches):
            batch = loader.next_batch()
        if device.type == "cuda":
            torch.cuda.synchronize()
        del batch
        return {"name": "data loader alone",
                "batches_per_s": n_batches / (time.perf_counter() - t0)}


def rows_for(cfg: BenchConfig, device) -> list[Row]:
    compiled = cfg.compile == "true" or (cfg.compile == "auto" and device.type == "cuda")
    base = dict(model=cfg.model, block_size=cfg.block_size, batch_size=cfg.batch_size,
                compiled=compiled)
    wanted = [c for c in cfg.compare.split(",") if c]
    unknown = set(wanted) - {"objective", "head", "attention", "compile", "loader"}
    if unknown:
        raise SystemExit(f"error: unknown comparison(s) {sorted(unknown)}; choose from objective, "
                         f"head, attention, compile, loader")
    rows = [Row("clm", **base), Row("mlm", objective="mlm", **base)]
    if "head" in wanted:
        rows.append(Row("mlm, dense head", objective="mlm", sparse_head=False, **base))
    if "attention" in wanted:
        rows += [Row("clm, manual attention", attention="manual", **base),
                 Row("mlm, manual attention", objective="mlm", attention="manual", **base)]
    if "compile" in wanted:
        other = dict(base, compiled=not compiled)
        tag = "compiled" if not compiled else "eager"
        rows += [Row(f"clm, {tag}", **other), Row(f"mlm, {tag}", objective="mlm", **other)]
    if cfg.scaling:
        for model in cfg.scaling_models.split(","):
            for context in map(int, cfg.scaling_contexts.split(",")):
                for objective in ("clm", "mlm"):
                    rows.append(Row("scaling", model=model, objective=objective, block_size=context,
                                    batch_size=cfg.batch_size, compiled=compiled))
    return rows


def ratios(results: list[dict]) -> list[tuple[str, float]]:
    """The comparisons as speed ratios (> 1: the first is faster)."""
    by_name = {r["name"]: r for r in results if "ms_per_step" in r}

    def speedup(slow, fast):
        return by_name[slow]["ms_per_step"] / by_name[fast]["ms_per_step"]

    pairs = [("MLM step vs CLM step (sparse head)", "clm", "mlm"),
             ("MLM sparse head vs dense head", "mlm, dense head", "mlm"),
             ("SDPA vs manual attention, CLM", "clm, manual attention", "clm"),
             ("SDPA vs manual attention, MLM", "mlm, manual attention", "mlm"),
             ("compiled vs eager, CLM", "clm, eager", "clm"),
             ("compiled vs eager, MLM", "mlm, eager", "mlm"),
             ("compiled vs eager, CLM", "clm", "clm, compiled"),
             ("compiled vs eager, MLM", "mlm", "mlm, compiled")]
    return [(label, speedup(slow, fast)) for label, slow, fast in pairs
            if slow in by_name and fast in by_name]


def table(results: list[dict]) -> str:
    header = (f"{'row':<24} {'model':<6} {'ctx':>5} {'batch':>5} {'ms/step':>9} {'tokens/s':>11} "
              f"{'MFU':>6} {'peak GB':>8}")
    lines = [header, "-" * len(header)]
    for r in results:
        if "batches_per_s" in r:
            continue
        if "error" in r:
            lines.append(f"{r['name']:<24} {r['model']:<6} {r['block_size']:>5} "
                         f"{r['batch_size']:>5}  {r['error']}")
            continue
        mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "-"
        name = (r["name"] if r["name"] != "scaling"
                else f"{r['objective']}{', compiled' if r['compiled'] else ''}")
        lines.append(f"{name:<24} {r['model']:<6} {r['block_size']:>5} {r['batch_size']:>5} "
                     f"{r['ms_per_step']:>9.1f} {r['tokens_per_s']:>11,.0f} {r['mfu']:>6.1%} "
                     f"{mem:>8}")
    return "\n".join(lines)


# rows not started by then are reported as skipped, so the suite ends within 8 minutes
GPU_SUITE_BUDGET_S = 420


def gpu_suite(cfg: BenchConfig) -> tuple[BenchConfig, list[Row]]:
    """The README's GPU figures: the paper presets at the paper's context, compiled, bf16, the most
    telling rows first since compilation takes most of the time budget."""
    suite = BenchConfig(tokenizer="cl100k", steps=10, warmup=3, compile="true", device=cfg.device,
                        json=cfg.json)
    big = lambda name, model, objective, batch, **kw: \
        Row(name, model, objective, 2048, batch, compiled=True, **kw)  # noqa: E731
    return suite, [
        big("210m clm", "210m", "clm", 8), big("210m mlm", "210m", "mlm", 8),
        big("210m mlm, dense head", "210m", "mlm", 8, sparse_head=False),
        big("610m clm", "610m", "clm", 4), big("610m mlm", "610m", "mlm", 4),
        big("1b clm", "1b", "clm", 4), big("1b mlm", "1b", "mlm", 4),
        Row("210m clm, ctx 512", "210m", "clm", 512, 32, compiled=True),
        Row("210m clm, ctx 1024", "210m", "clm", 1024, 16, compiled=True),
    ]


def flash_check(device) -> str:
    """Whether the flash kernel really runs for both attention directions at the paper's shapes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(1, 12, 2048, 64, device=device, dtype=torch.bfloat16)
    verdicts = []
    for causal in (True, False):
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=causal)
            verdicts.append(f"{'causal' if causal else 'bidirectional'}: flash")
        except RuntimeError as e:
            verdicts.append(f"{'causal' if causal else 'bidirectional'}: no flash ({str(e)[:80]})")
    return "; ".join(verdicts)


def main(argv: list[str]):
    cfg = configure(BenchConfig, argv)
    device, autocast = device_and_autocast(cfg.device, "auto")  # bfloat16 on CUDA, as train.py
    if cfg.suite not in ("", "gpu"):
        raise SystemExit("error: suite must be '' or 'gpu'")
    if cfg.suite == "gpu":
        if device.type != "cuda":
            raise SystemExit("error: --suite=gpu needs a CUDA device")
        cfg, rows = gpu_suite(cfg)
    else:
        rows = rows_for(cfg, device)
    tok = get_tokenizer(cfg.tokenizer)
    vocab = tok.vocab()
    peak = peak_flops(device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads")
    header = (f"# bench.py on {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; peak "
              f"{peak / 1e12:.3g} TFLOP/s "
              f"({'data sheet, bf16' if device.type == 'cuda' else 'measured, float32'}); "
              f"median of {cfg.steps} steps after {cfg.warmup}; "
              f"command: python bench.py {' '.join(argv)}")
    results, t_start = [], time.perf_counter()
    for i, row in enumerate(rows):
        if cfg.suite == "gpu" and time.perf_counter() - t_start > GPU_SUITE_BUDGET_S:
            result = {**row.__dict__, "error": "skipped: suite time budget spent"}
        else:
            result = measure(row, vocab, device, autocast, cfg, peak, cfg.profile if i == 0 else "")
        results.append(result)
        if cfg.json:
            print(json.dumps(result))
        else:
            print(f"  measured {row.name} ({row.model}, ctx {row.block_size})", file=sys.stderr)
    if cfg.suite == "gpu" or "loader" in cfg.compare.split(","):
        loader = measure_loader(cfg, tok.meta(), device)
        step_rate = 1000 / next(r["ms_per_step"] for r in results if "ms_per_step" in r)
        loader["times_step_rate"] = loader["batches_per_s"] / step_rate
        results.append(loader)
        if cfg.json:
            print(json.dumps(loader))
    report = [header, "", table(results), ""]
    report += [f"{label}: {ratio:.2f}x" for label, ratio in ratios(results)]
    report += [f"data loader alone: {r['batches_per_s']:,.0f} batches/s, "
               f"{r['times_step_rate']:,.0f}x the rate of the first row's steps"
               for r in results if "batches_per_s" in r]
    if device.type == "cuda":
        report.append(f"flash attention at (1, 12, 2048, 64) bf16: {flash_check(device)}")
    text = "\n".join(report)
    if not cfg.json:
        print(text)
    if cfg.out:
        with open(cfg.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
