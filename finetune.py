"""
Fine-tune a pretraining checkpoint on one task and evaluate it the way the paper does.

    python finetune.py --init_from=out/demo/ckpt.pt --task=demo_sc
                                                   # an offline demo task
    python finetune.py --init_from=ckpt.pt --task=sc --train=train.jsonl --test=dev.jsonl
                                                   # your own data
    python finetune.py --init_from=ckpt.pt --task=squad_v2
                                                   # a paper dataset (pip install datasets; network)
    python finetune.py --help                      # every setting

The protocol (the paper's): bidirectional attention whatever the pretraining objective
(--causal=True is an ablation); AdamW (0.9, 0.95), eps 1e-5, weight decay 0.1; 10% linear warmup,
then linear decay to 0; batch 32; at most 1,000 steps or one epoch, whichever is smaller; 5% of
the training file held out as validation; the test file is the dataset's official validation
split. Every (learning rate, seed) cell of the grid is fine-tuned from the same checkpoint and
appended to out_dir/results.jsonl as soon as it finishes, so an interrupted sweep restarts where
it stopped. The report (printed, and out_dir/report.json) gives per learning rate the seed mean
and its 95% confidence interval, the learning rate chosen on validation with its test score, and
the stability figure.

The four task families (tasks.py) put a small head on the pretrained body:

  sc  sequence classification   pooled hidden states + linear           accuracy
  tc  token classification      linear on each word's first sub-token   entity F1 (conlleval)
  qa  extractive QA             start/end logits per token              SQuAD F1 (and exact match)
  ir  retrieval                 pooled, normalised embedding (InfoNCE)  nDCG@10 (and MRR@10)

Scores are in points (0-100). Task records come from JSON-lines files in the schemas of
task_data.py, from the paper's datasets through the optional `datasets` package
(task_data.HF_TASKS), or from the offline demo tasks built from docstrings that pretraining never
saw (docstrings.py) - those are for trying the pipeline, not for comparison with the paper.
"""

import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from tqdm import tqdm

import data
import files
from device import device_and_autocast
from experiment import summarize
from hf import load_hf
from metrics import mean_ci
from checkpoints import load_checkpoint
from model import configure_optimizer
from settings import configure
from task_data import HF_TASKS, hold_out, load_task
from tasks import FAMILIES, Family
from train import lr_at


@dataclass
class FinetuneConfig:
    # what to fine-tune, on what
    init_from: str = ""  # pretraining checkpoint (train.py writes out_dir/ckpt.pt); required
    task: str = "demo_sc"  # sc/tc/qa/ir (+ --train/--test), demo_sc/tc/qa/ir (offline), or HF_TASKS
    train: str = ""  # JSONL training file (sc|tc|qa|ir); val_fraction of it held out as validation
    test: str = ""  # JSONL test file for sc|tc|qa|ir (the paper: the official validation split)
    corpus: str = ""  # ir only: JSONL {"text": str} of extra documents ranked with the test split's
    out_dir: str = "out/finetune"  # results.jsonl (one line per finished cell) and report.json
    # the sweep
    lrs: str = "1e-5,2e-5,5e-5,1e-4,2e-4,5e-4"  # learning-rate grid, comma-separated (the paper's)
    seeds: int = 5  # seeds 0..seeds-1 at each learning rate (head init and batch order)
    # the protocol
    batch_size: int = 32  # examples per step (qa: context windows; ir: query-document pairs)
    max_steps: int = 1000  # step cap; training also stops after one epoch, whichever comes first
    warmup: float = 0.1  # fraction of the steps with linear warmup from 0, then linear decay to 0
    val_fraction: float = 0.05  # share of training held out (deterministically) to choose the lr
    weight_decay: float = 0.1  # AdamW, matrices only; betas (0.9, 0.95), eps 1e-5 as in model.py
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    # the model
    causal: bool = False  # fine-tune with causal attention (ablation: the paper is bidirectional)
    pooling: str = "mean"  # sc/ir sequence vector: mean of real tokens, first, or last real token
    max_len: int = 512  # tokens per input, at most block_size; longer inputs are cut (qa: windowed)
    doc_stride: int = 128  # qa: tokens shared by consecutive windows over a long context
    max_answer_tokens: int = 30  # qa: longest answer span considered at prediction
    temperature: float = 0.05  # ir: InfoNCE softmax temperature on cosine similarities
    # system
    device: str = "auto"  # "auto" (cuda, then mps, then cpu) or a torch device string
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on CUDA, else float32), bfloat16, float32
    progress: bool = True  # tqdm progress bars
    # summarising an experiment instead of fine-tuning
    summarize: str = ""  # dir of train.py out_dirs (sweeps in subdirectories): print their table
    figures: str = ""  # with --summarize: directory for two figures (needs matplotlib); "" = none


def learning_rates(cfg: FinetuneConfig) -> list[float]:
    try:
        lrs = [float(x) for x in cfg.lrs.split(",")]
    except ValueError:
        raise SystemExit(f"error: --lrs must be comma-separated numbers, got {cfg.lrs!r}") from None
    if not lrs or min(lrs) <= 0 or len(set(lrs)) != len(lrs):
        raise SystemExit(f"error: --lrs must be distinct positive numbers, got {cfg.lrs!r}")
    return lrs


def validate(cfg: FinetuneConfig):
    checks = [
        (cfg.init_from != "" or cfg.summarize != "",
         "--init_from (a pretraining checkpoint) is required"),
        (not cfg.figures or cfg.summarize, "--figures goes with --summarize"),
        ((cfg.task in FAMILIES or cfg.task in HF_TASKS
          or cfg.task in [f"demo_{f}" for f in FAMILIES]),
         f"--task must be one of {', '.join(FAMILIES)} (with --train/--test), "
         f"{', '.join('demo_' + f for f in FAMILIES)}, or {', '.join(HF_TASKS)}"),
        (cfg.task not in FAMILIES or (cfg.train and cfg.test),
         f"--task={cfg.task} needs --train and --test files"),
        (cfg.task in FAMILIES or not (cfg.train or cfg.test),
         "--train/--test are for --task=sc|tc|qa|ir only"),
        (not cfg.corpus or cfg.task in ("ir", "demo_ir", "msmarco"),
         "--corpus is for retrieval tasks only"),
        (cfg.seeds >= 1 and cfg.batch_size >= 1 and cfg.max_steps >= 1,
         "seeds, batch_size, max_steps must be >= 1"),
        (0 <= cfg.warmup < 1 and 0 < cfg.val_fraction < 1,
         "warmup must be in [0, 1), val_fraction in (0, 1)"),
        (cfg.grad_clip >= 0,
         "grad_clip must be >= 0 (0 = off; a negative bound would turn clipping into ascent)"),
        (cfg.pooling in ("mean", "first", "last"), "pooling must be mean, first or last"),
        ((cfg.max_len >= 8 and cfg.max_answer_tokens >= 1 and cfg.doc_stride >= 0
          and cfg.temperature > 0),
         "max_len >= 8, max_answer_tokens >= 1, doc_stride >= 0, temperature > 0"),
        (cfg.dtype in ("auto", "bfloat16", "float32"), "dtype must be auto, bfloat16 or float32"),
    ]
    problems = [message for ok, message in checks if not ok]
    if problems:
        raise SystemExit("error: " + "; ".join(problems))
    learning_rates(cfg)

# --------------------------------------------------------------------------------------------------
# One cell: fine-tune from the checkpoint at one learning rate and seed,
# then score validation and test


def finetune_cell(family: Family, body, splits: dict, cfg: FinetuneConfig, lr: float,
                  seed: int) -> dict:
    """Trains body (in place) and a new head;
    returns the scores of each split in `splits` other than "train"."""
    torch.manual_seed(seed)
    head = family.head(body.config.n_embd).to(family.device)
    both = nn.ModuleDict({"body": body, "head": head})
    optimizer = configure_optimizer(both, lr, cfg.weight_decay, device_type=family.device.type)
    items = splits["train"].items
    steps = min(cfg.max_steps, math.ceil(len(items) / cfg.batch_size))
    warmup_steps = math.ceil(cfg.warmup * steps)
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    both.train()
    diverged = None
    for step in tqdm(range(steps), desc=f"lr {lr:g} seed {seed}", leave=False,
                     disable=not cfg.progress):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr, steps, warmup_steps, steps - warmup_steps)
        loss = family.loss(body, head, [items[i] for i in
                                        order[step * cfg.batch_size:(step + 1) * cfg.batch_size]])
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(both.parameters(), cfg.grad_clip or float("inf"))
        if not torch.isfinite(torch.stack([loss.detach(), grad_norm])).all():
            # A real outcome at a high learning rate: the update is not applied, and the cell is
            # scored with the weights of its last finite step. A finite loss can come with a
            # non-finite gradient.
            diverged = step
            optimizer.zero_grad(set_to_none=True)  # the body is reused by the next cell
            break
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    both.eval()
    with torch.no_grad():
        scores = {name: {k: 100 * v for k, v in family.evaluate(body, head, split).items()}
                  for name, split in splits.items() if name != "train"}
    return {**scores, "steps": steps, "diverged_at": diverged}

# --------------------------------------------------------------------------------------------------
# The sweep and its report


def read_results(path: str, key: str) -> dict:
    """(lr, seed) -> result of the cells already in path for this configuration (the key). The torn
    last line of a sweep killed mid-write is cut from the file; that cell is simply done again."""
    return {(r["lr"], r["seed"]): r for r in files.read_json_lines(path, repair=True)
            if r.get("key") == key}


def sweep(family: Family, body, splits: dict, cfg: FinetuneConfig, key: str) -> list[dict]:
    """Every (lr, seed) cell, from out_dir/results.jsonl when it is there with the same key,
    else fine-tuned now."""
    path = os.path.join(cfg.out_dir, "results.jsonl")
    done = read_results(path, key)
    cells = [(lr, seed) for lr in learning_rates(cfg) for seed in range(cfg.seeds)]
    todo = [cell for cell in cells if cell not in done]
    print(f"{len(cells) - len(todo)} of {len(cells)} cells already in {path}; "
          f"fine-tuning {len(todo)}")
    initial = {k: v.detach().clone() for k, v in body.state_dict().items()}
    for lr, seed in tqdm(todo, desc="cells", disable=not cfg.progress):
        body.load_state_dict(initial)
        t0 = time.perf_counter()
        result = {"key": key, "lr": lr, "seed": seed,
                  **finetune_cell(family, body, splits, cfg, lr, seed),
                  "seconds": round(time.perf_counter() - t0, 1)}
        with open(path, "a", encoding="utf-8") as f:
            f.write(files.json_line(result))
        done[lr, seed] = result
    body.load_state_dict(initial)
    return [done[cell] for cell in cells]


def report(results: list[dict], metric: str) -> dict:
    """Per learning rate: the seed mean of the validation and test scores with their 95% intervals.
    The chosen learning rate has the best mean validation score (the smaller one on a tie).
    Stability: the standard deviation (n - 1) across the learning rates of the grid of the seed-mean
    test score, in points - how far the score moves when the learning rate is mis-set; lower is more
    stable (the paper's finding 2: CLM-pretrained models move less)."""
    per_lr = []
    for lr in dict.fromkeys(r["lr"] for r in results):
        cells = [r for r in results if r["lr"] == lr]
        val_mean, val_ci = mean_ci([r["val"][metric] for r in cells])
        test_mean, test_ci = mean_ci([r["test"][metric] for r in cells])
        per_lr.append({"lr": lr, "seeds": len(cells), "val_mean": val_mean, "val_ci95": val_ci,
                       "test_mean": test_mean, "test_ci95": test_ci,
                       "diverged": sum(r["diverged_at"] is not None for r in cells)})
    chosen = max(per_lr, key=lambda row: (row["val_mean"], -row["lr"]))
    test_means = [row["test_mean"] for row in per_lr]
    return {"metric": metric, "per_lr": per_lr, "chosen_lr": chosen["lr"],
            "test_mean": chosen["test_mean"], "test_ci95": chosen["test_ci95"],
            "stability_sd": statistics.stdev(test_means) if len(test_means) > 1 else None}


def print_report(rep: dict):
    plus = lambda mean, ci: \
        f"{mean:6.2f} ± {ci:5.2f}" if ci is not None else f"{mean:6.2f}        "  # noqa: E731
    print(f"\n{'lr':>8} {'seeds':>5}   {'val ' + rep['metric']:<15}   "
          f"{'test ' + rep['metric']:<15}")
    for row in rep["per_lr"]:
        flag = f"  ({row['diverged']} diverged)" if row["diverged"] else ""
        print(f"{row['lr']:>8.1e} {row['seeds']:>5}   {plus(row['val_mean'], row['val_ci95'])}   "
              f"{plus(row['test_mean'], row['test_ci95'])}{flag}")
    ci = f" ± {rep['test_ci95']:.2f}" if rep["test_ci95"] is not None else ""
    print(f"chosen on validation: lr {rep['chosen_lr']:.1e}, test {rep['metric']} "
          f"{rep['test_mean']:.2f}{ci} (mean ± 95% CI over seeds)")
    if rep["stability_sd"] is not None:
        print(f"stability: sd of the seed-mean test score across the lr grid = "
              f"{rep['stability_sd']:.2f} points")
    if "trivial" in rep:
        print(f"a constant prediction ({rep['trivial']['rule']}) scores "
              f"{rep['trivial']['test']:.2f} on test")


def main(argv: list[str]) -> dict:
    cfg = configure(FinetuneConfig, argv)
    validate(cfg)
    try:
        return summarize(cfg.summarize, cfg.figures) if cfg.summarize else finetune(cfg)
    except (ValueError, OSError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None


def finetune(cfg: FinetuneConfig) -> dict:
    device, autocast = device_and_autocast(cfg.device, cfg.dtype)
    if cfg.init_from.startswith("hf:"):  # a Hugging Face decoder as it is, with its own tokenizer
        tok = data.get_tokenizer(cfg.init_from)
        body, ckpt = load_hf(cfg.init_from.removeprefix("hf:"), tok).to(device), {}
    else:
        body, ckpt = load_checkpoint(cfg.init_from, device)
        if "tokenizer" not in ckpt:
            raise ValueError(f"{cfg.init_from} has no tokenizer description (key 'tokenizer'): "
                             f"not from train.py?")
        tok = data.get_tokenizer(ckpt["tokenizer"]["tokenizer"])
        data.check_tokenizer(tok.meta(), ckpt["tokenizer"], cfg.init_from,
                             f"the tokenizer {tok.name} here")
    # hf: bodies have none
    data_dir = data.data_dir_of(ckpt["train_config"]) if "train_config" in ckpt else ""
    family_name, train, test, extra = load_task(cfg, data_dir)
    max_len = min(cfg.max_len, body.config.block_size)
    family = FAMILIES[family_name](cfg, tok, train, device, autocast, max_len)
    family.check(test)
    train, val = hold_out(train, family_name, cfg.val_fraction)
    splits = {"train": family.encode(train), "val": family.encode(val),
              "test": family.encode(test, extra) if extra else family.encode(test)}
    print(f"{cfg.task} ({family_name}): {len(train):,} train / {len(val):,} validation / "
          f"{len(test):,} test records -> {len(splits['train'].items):,} training items; "
          f"body {cfg.init_from} on {device}, max_len {max_len}")
    del ckpt  # the body holds the weights
    # A cell is only reused when everything that decides its result is the same: settings,
    # checkpoint and data.
    settings = {k: v for k, v in asdict(cfg).items()
                if k not in ("lrs", "seeds", "out_dir", "device", "progress")}
    stat = os.stat(cfg.init_from.removeprefix("hf:"))
    fingerprint = json.dumps([settings, stat.st_size, stat.st_mtime_ns, train, test, extra],
                             sort_keys=True)
    key = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    # One sweep at a time in an out_dir:
    # two would do the same cells twice and interleave results.jsonl.
    with files.exclusive(os.path.join(cfg.out_dir, ".lock"), f"fine-tuning in {cfg.out_dir}"):
        results = sweep(family, body, splits, cfg, key)
        rep = {"task": cfg.task, "family": family_name, "init_from": cfg.init_from, "key": key,
               **report(results, family.metric)}
        if family.trivial_rule:
            rep["trivial"] = {"rule": family.trivial_rule,
                              "test": 100 * family.trivial(splits["test"])[family.metric]}
        rep["settings"] = asdict(cfg)
        print_report(rep)
        path = os.path.join(cfg.out_dir, "report.json")
        files.write_text_atomically(path, json.dumps(files.strict(rep), indent=1))
    print(f"wrote {path}")
    return rep


if __name__ == "__main__":
    main(sys.argv[1:])
