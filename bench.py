"""Speed and memory of train.py's own step, CLM then MLM; --compare=transformers (Llama, EuroBERT),
--memory=true (the presets' memory model), --suite=gpu (under 8 minutes). docs/speed.md."""

import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch._dynamo.utils import counters

import train
from data import write_tokens
from mlm_vs_clm import files
from mlm_vs_clm.parallel import device_and_autocast, device_problem
from mlm_vs_clm.settings import above, at_least, command, configure, optional, run_config_file
from mlm_vs_clm.tokenizer import get_tokenizer
from model import Transformer, configure_optimizer, model_config
from objectives import linear_cross_entropy, mask_draws, predicted_rows, pretraining_loss

@dataclass
class BenchConfig:
    model: str = "tiny"  # model.py preset
    block_size: int = 128  # tokens per sequence
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 2  # micro-batches per step
    tokenizer: str = "cl100k_8k"  # vocabulary size and special ids (the paper presets: cl100k)
    steps: int = 40  # steps of the timed run: CLM for the first half, then MLM
    compile: str = "auto"  # torch.compile, as train.py: auto (on CUDA), true, false
    device: str = "auto"  # auto (cuda, then mps, then cpu) or a torch device string
    compare: str = ""  # "transformers": also time transformers' steps on the same shapes
    memory: bool = False  # print the memory model of the paper's presets instead of timing
    gpu_gb: float = 80.0  # the memory model's GPU memory
    gpus: int = 8  # the memory model's processes, for FSDP's shards
    memory_presets: str = "210m,610m,1b"  # the presets of the memory model
    suite: str = ""  # "gpu": the fixed GPU suite (docs/speed.md), overriding the settings above
    out: str = ""  # also write the report to this file
    json: bool = False  # one JSON object per row instead of the report

    def checks(self):
        return [(self.compare in ("", "transformers"), "--compare must be '' or transformers"),
                (self.suite in ("", "gpu"), "--suite must be '' or gpu"),
                (device_problem(self.device) is None, device_problem(self.device)),
                *above(self, 0, "gpu_gb"), *at_least(self, 4, "steps"),
                *at_least(self, 1, "gpus", "block_size", "batch_size", "grad_accum")]

# The real step: train.py on synthetic token files

def real_run(cfg: BenchConfig, model: str, block_size: int, batch_size: int) -> dict:
    """One whole train.py run on synthetic tokens, timed from its log and torch's counters."""
    tok, rng = get_tokenizer(cfg.tokenizer), np.random.default_rng(0)
    sequences = {"train": cfg.steps * cfg.grad_accum + 4, "val": 4}  # each batch_size x block_size
    with tempfile.TemporaryDirectory() as tmp:
        write_tokens(tmp, {split: rng.integers(0, tok.n_vocab - 3, n * batch_size * block_size)
                           for split, n in sequences.items()}, tok.meta(), "synthetic")
        argv = [f"--data_dir={tmp}", f"--tokenizer={cfg.tokenizer}", f"--model={model}",
                f"--block_size={block_size}", f"--batch_size={batch_size}",
                f"--total_batch_size={batch_size * cfg.grad_accum}", f"--max_steps={cfg.steps}",
                "--switch_at=0.5", "--warmup_steps=1", "--decay_steps=1", "--eval_batches=2",
                f"--eval_interval={cfg.steps // 2}", f"--log_interval={max(1, cfg.steps // 8)}",
                "--progress=False", f"--compile={cfg.compile}", f"--device={cfg.device}",
                f"--out_dir={os.path.join(tmp, 'out')}"]
        counters.clear()
        torch._dynamo.reset()
        cuda = torch.cuda.is_available() and (cfg.device == "auto" or cfg.device.startswith("cuda"))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            train.main(argv)
            seconds = time.perf_counter() - t0
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
        records = [r for r in files.read_json_lines(os.path.join(tmp, "out", "log.jsonl"))
                   if "loss" in r]
    syncs = sum("synchroniz" in str(w.message) for w in caught) if cuda else None
    row = {"model": model, "block_size": block_size, "batch_size": batch_size,
           "grad_accum": cfg.grad_accum, "seconds": seconds,
           "compile_s": sum(torch._dynamo.utils.calculate_time_spent().values()),
           "graphs": counters["stats"]["unique_graphs"],
           "graph_breaks": sum(counters["graph_break"].values()),
           "syncs_per_step": None if syncs is None else syncs / cfg.steps,
           "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "memory_model_gb": memory_model(model, tok.n_vocab, block_size, 1,
                                           activation_bytes(model))(batch_size)["ddp_gb"]}
    for objective in ("clm", "mlm"):  # the first interval of each phase holds its compilation
        steady = [r for r in records if r["objective"] == objective][cfg.steps // 8:]
        row[f"{objective}_tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in steady)
        row[f"{objective}_mfu"] = statistics.median(r["mfu"] for r in steady)
    return row

def head_share(cfg: BenchConfig, model_name: str, block_size: int, batch_size: int,
               device, autocast) -> dict:
    """The LM head and its loss alone: their share of a whole step's time and (CUDA) peak memory."""
    vocab = get_tokenizer(cfg.tokenizer).vocab()
    model = Transformer(model_config(model_name, vocab_size=vocab.size,
                                     block_size=block_size)).to(device)
    tokens = torch.randint(0, vocab.size - 3, (batch_size, block_size), device=device)
    shares = {}
    for objective in ("clm", "mlm"):
        draws = mask_draws(tokens.shape, "mask", device=device) if objective == "mlm" else None

        def whole():
            with autocast():
                loss, n = pretraining_loss(model, tokens, objective, vocab, draws=draws)
            (loss * n).backward()

        def head():
            hidden = torch.randn(batch_size, block_size, model.config.n_embd, device=device,
                                 requires_grad=True)
            labels = tokens if objective == "clm" else torch.where(draws[0] < 0.4, tokens, -100)
            rows, y = (hidden.flatten(0, 1), labels.flatten()) if objective == "clm" \
                else predicted_rows(hidden, labels, 0.4)
            with autocast():
                loss, _ = linear_cross_entropy(rows, model.lm_head.weight, y)
            loss.backward()
        times, peaks = {}, {}
        for name, fn in (("whole", whole), ("head", head)):
            fn()  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(3):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
                peaks[name] = torch.cuda.max_memory_allocated()
            times[name] = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
        shares[f"{objective}_head_time"] = times["head"] / times["whole"]
        shares[f"{objective}_head_memory"] = peaks["head"] / peaks["whole"] if peaks else None
    return shares

def sdpa_kernel(device) -> dict:
    """Which SDPA kernel runs at the 1b shape (head dim 96, 18 query heads over 6 KV heads)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(1, 18, 512 if device.type == "cpu" else 2048, 96, device=device, dtype=dtype)
    kv = torch.randn(1, 6, q.size(2), 96, device=device, dtype=dtype)
    kernels = {}
    for causal in (True, False):
        with torch.profiler.profile() as prof:
            torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=causal,
                                                             enable_gqa=True)
        names = [e.name for e in prof.events() if "attention" in e.name.lower()]
        kernels["causal" if causal else "bidirectional"] = next(
            (k for k in ("cudnn", "flash", "efficient") if any(k in n for n in names)), "math")
    return kernels

# Against transformers, one thread, the same shapes

def compare_transformers(cfg: BenchConfig, rounds: int = 9) -> dict:
    """Thread CPU time of a step, ours vs Llama (CLM) and EuroBERT (MLM, head on every position)."""
    transformers = optional("transformers", "--compare=transformers")
    torch.set_num_threads(1)
    vocab = get_tokenizer(cfg.tokenizer).vocab()
    ours = Transformer(model_config(cfg.model, vocab_size=vocab.size, block_size=cfg.block_size))
    c = ours.config
    shape = dict(vocab_size=c.padded_vocab_size, hidden_size=c.n_embd, num_hidden_layers=c.n_layer,
                 num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                 intermediate_size=c.mlp_hidden, max_position_embeddings=c.block_size,
                 attn_implementation="sdpa", bos_token_id=None, eos_token_id=vocab.special_ids[0],
                 pad_token_id=vocab.pad_id, mask_token_id=vocab.mask_id)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
    eurobert = transformers.EuroBertForMaskedLM(transformers.EuroBertConfig(**shape))
    tokens = torch.randint(0, vocab.size - 3, (cfg.batch_size, cfg.block_size))
    draws = mask_draws(tokens.shape, "mask", torch.Generator().manual_seed(0))
    masked = torch.where(draws[0] < 0.4, vocab.mask_id, tokens)
    labels = torch.where(draws[0] < 0.4, tokens, -100)
    optimizers = {m: configure_optimizer(m, 1e-4) for m in (ours, llama, eurobert)}

    def step(model, loss):
        loss.backward()
        optimizers[model].step()
        optimizers[model].zero_grad(set_to_none=True)
    rows = {"ours clm": lambda: step(ours, pretraining_loss(ours, tokens, "clm", vocab)[0]),
            "llama clm": lambda: step(llama, llama(input_ids=tokens, labels=tokens).loss),
            "ours mlm": lambda: step(ours, pretraining_loss(ours, tokens, "mlm", vocab,
                                                            draws=draws)[0]),
            "eurobert mlm": lambda: step(eurobert, eurobert(input_ids=masked, labels=labels).loss)}
    times = {name: [] for name in rows}
    for _ in range(rounds):
        for name, fn in rows.items():
            t0 = time.thread_time()
            fn()
            times[name].append(time.thread_time() - t0)
    ms = {name: 1000 * statistics.median(t[1:]) for name, t in times.items()}
    with torch.profiler.profile() as prof:
        rows["ours clm"]()
    events = prof.key_averages()
    # matrix products: the linear layers, and attention's two inside the SDPA kernels
    matmul = sum(e.self_cpu_time_total for e in events
                 if e.key in ("aten::mm", "aten::addmm", "aten::bmm") or "dot_product" in e.key)
    return {**{f"{k} ms": v for k, v in ms.items()},
            "clm speed-up": ms["llama clm"] / ms["ours clm"],
            "mlm speed-up": ms["eurobert mlm"] / ms["ours mlm"],
            "matmul share of our clm step": matmul / sum(e.self_cpu_time_total for e in events)}

# The memory model

def saved_bytes(preset: str, n_layer: int, tokens: int) -> int:
    """Bytes one sequence through n_layer blocks saves for backward (bf16 autocast, no LM head)."""
    model = Transformer(model_config(preset, vocab_size=256, n_layer=n_layer, block_size=tokens))
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 256, (1, tokens)), causal=False)
    return total[0]

def activation_bytes(preset: str) -> dict:
    """Saved bytes per token per block, per block (bf16 weight copies), per token outside blocks."""
    s = {(n, t): saved_bytes(preset, n, t) for n in (1, 2) for t in (16, 32)}
    per_token = ((s[2, 32] - s[1, 32]) - (s[2, 16] - s[1, 16])) / 16
    return {"per_token_block": per_token, "per_block": s[2, 32] - s[1, 32] - 32 * per_token,
            "per_token_outside": (s[1, 32] - s[1, 16]) / 16 - per_token}

def memory_model(preset: str, vocab_size: int, block_size: int, gpus: int, saved: dict):
    """micro-batch -> peak GB of a GPU: 16 B/parameter (fp32 weights, grads, AdamW), activations."""
    cfg = model_config(preset, vocab_size=vocab_size, block_size=block_size)
    with torch.device("meta"):
        model = Transformer(cfg)
    params = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.blocks[0].parameters())
    root = params - cfg.n_layer * block

    def estimate(micro: int) -> dict:
        tokens = micro * block_size
        activations = (tokens * (saved["per_token_block"] * cfg.n_layer
                                 + saved["per_token_outside"]) + saved["per_block"] * cfg.n_layer)
        head = cfg.n_embd * cfg.padded_vocab_size * (4 + 4 + 2) + tokens * cfg.n_embd * 4
        fsdp = 16 * params / gpus + 4 * (root + 2 * block) + activations + head
        return {"params": params, "activations_gb": activations / 2**30,
                "ddp_gb": (16 * params + activations + head) / 2**30, "fsdp_gb": fsdp / 2**30}
    return estimate

def memory_table(cfg: BenchConfig) -> list[dict]:
    """Each preset, its config file's shape and tokenizer: estimate, largest micro-batch to fit."""
    rows = []
    for preset in cfg.memory_presets.split(","):
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", f"{preset}.py")
        preset_cfg = run_config_file(path) if os.path.exists(path) else {}
        micro = preset_cfg.get("batch_size", cfg.batch_size)
        block_size = preset_cfg.get("block_size", cfg.block_size)
        vocab_size = get_tokenizer(preset_cfg.get("tokenizer", cfg.tokenizer)).n_vocab
        estimate = memory_model(preset, vocab_size, block_size, cfg.gpus, activation_bytes(preset))
        largest = {f"largest_{k}": max([b for b in range(1, 257) if estimate(b)[f"{k}_gb"]
                                        <= 0.9 * cfg.gpu_gb], default=0) for k in ("ddp", "fsdp")}
        rows.append({"preset": preset, "block_size": block_size, "micro_batch": micro,
                     **estimate(micro), **largest, "gpu_gb": cfg.gpu_gb})
    return rows

GPU_SUITE = (("210m", 2048, 16), ("610m", 2048, 8), ("1b", 2048, 4))
GPU_SUITE_BUDGET_S = 420  # rows not started by then are skipped: the suite ends within 8 minutes

@command
def main(argv: list[str]):
    cfg = configure(BenchConfig, argv)
    device, autocast = device_and_autocast(cfg.device, "auto")
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads")
    header = (f"# bench.py on {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
              f"command: python bench.py {' '.join(argv)}")
    if cfg.suite and not cfg.memory:  # --memory=true prints the memory model alone
        if device.type != "cuda":
            raise SystemExit("error: --suite=gpu needs a CUDA device")
        cfg.tokenizer, cfg.compile, cfg.steps = "cl100k", "true", 12
    shapes = GPU_SUITE if cfg.suite else [(cfg.model, cfg.block_size, cfg.batch_size)]
    rows, t_start = [], time.perf_counter()
    for model, block, batch in [] if cfg.memory else shapes:
        if time.perf_counter() - t_start > GPU_SUITE_BUDGET_S:
            rows.append({"model": model, "skipped": "suite time budget spent"})
            continue
        rows.append({**real_run(cfg, model, block, batch),
                     **head_share(cfg, model, block, batch, device, autocast)})
    if not cfg.memory:
        rows.append({"sdpa at the 1b shape": sdpa_kernel(device)})
    if cfg.memory or cfg.suite:
        rows += memory_table(cfg)
    elif cfg.compare:
        rows.append(compare_transformers(cfg))
    lines = [json.dumps(row) if cfg.json else "  ".join(f"{k} {v:,.3g}" if isinstance(v, float)
             else f"{k} {v}" for k, v in row.items() if v is not None) for row in rows]
    text = "\n".join([header, *lines])
    print(text)
    if cfg.out:
        files.write_text_atomically(cfg.out, text + "\n")
    return rows

if __name__ == "__main__":
    main(sys.argv[1:])
