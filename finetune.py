"""Fine-tune a checkpoint on a task over an lr x seed grid as the paper does: test mean ± 95% CI.

    python finetune.py --init_from=out/demo/ckpt.pt --task=demo_sc       # an offline demo task
    python finetune.py --init_from=ckpt.pt --task=sc --train=train.jsonl --test=dev.jsonl
    python finetune.py --init_from=ckpt.pt --task=squad_v2               # a paper dataset
    python finetune.py --help                                            # every setting

The protocol, the four families, the file formats and the report: docs/finetuning.md."""

import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
from tqdm import tqdm

from data import data_dir_of
from mlm_vs_clm import files
from mlm_vs_clm.checkpoints import (checkpoint_payload, identity, load_model, save_checkpoint,
                                    source_problem)
from mlm_vs_clm.metrics import mean_ci
from mlm_vs_clm.parallel import device_and_autocast, device_problem
from mlm_vs_clm.settings import above, at_least, command, configure, one_of
from mlm_vs_clm.task_data import FAMILIES, HF_TASKS, family_class, hold_out, load_task
from mlm_vs_clm.tasks import INPUT_FORMATS, Family
from model import configure_optimizer, lr_at

@dataclass
class FinetuneConfig:
    # what to fine-tune, on what
    init_from: str = ""  # pretraining checkpoint (train.py writes out_dir/ckpt.pt); required
    task: str = "demo_sc"  # see below
    train: str = ""  # JSONL training file (sc|tc|qa|ir); val_fraction held out unless --val
    val: str = ""  # JSONL validation file (sc|tc|qa|ir); "" = hold out val_fraction of --train
    test: str = ""  # JSONL test file for sc|tc|qa|ir (the paper: the official validation split)
    corpus: str = ""  # ir only: JSONL {"text": str} of extra documents ranked with the test split's
    out_dir: str = ""  # results.jsonl (a line a cell) and report.json; "": out/finetune/<task>
    # the sweep
    lrs: str = "1e-5,2e-5,5e-5,1e-4,2e-4,5e-4"  # learning-rate grid, comma-separated (the paper's)
    seeds: int = 5  # seeds 0..seeds-1 at each learning rate (head init and batch order)
    # the protocol
    batch_size: int = 32  # examples per step (qa: context windows; ir: query-document pairs)
    max_steps: int = 1000  # steps; standard: also at most one epoch, encodeval: epoch after epoch
    warmup: float = 0.1  # fraction of the steps with linear warmup from 0, then linear decay to 0
    val_fraction: float = 0.05  # share of training held out (deterministically) to choose the lr
    weight_decay: float = 0.1  # AdamW, matrices only; betas (0.9, 0.95), eps 1e-5 as in model.py
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    # the model
    causal: bool = False  # fine-tune with causal attention (ablation: the paper is bidirectional)
    input_format: str = "paper"  # paper (labelled text + <eot>, the authors') or eot (a <eot> b)
    pooling: str = "mean"  # sc/ir: mean of real tokens, first (EuroBERT's "bos"), last real token
    max_len: int = 0  # tokens per input: 0 = 2028 for the paper's tasks (EncodEval's), else 512
    protocol: str = "auto"  # auto: encodeval for the paper's tasks, else standard (docs)
    doc_stride: int = 128  # qa: tokens shared by consecutive windows over a long context
    max_answer_tokens: int = 30  # qa: longest answer span considered at prediction
    temperature: float = 0.05  # ir: InfoNCE softmax temperature on cosine similarities
    empty_queries: str = "skip"  # ir: a query without relevant document: skip (EncodEval) or zero
    # system
    device: str = "auto"  # "auto" (cuda, then mps, then cpu) or a torch device string
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on CUDA, else float32), bfloat16, float32
    weights: str = "fp32"  # fp32 master weights (under bf16 autocast on CUDA); bf16: the authors'
    compile: bool = False  # torch.compile the body (sequence lengths vary: dynamic shapes)
    progress: bool = True  # tqdm progress bars
    save_model: bool = False  # retrain the chosen cell and save it to out_dir/model.pt

    HELP = {"task": f"demo_sc/tc/qa/ir (offline), sc/tc/qa/ir with --train/--test, or one of "
                    f"the paper's: {', '.join(HF_TASKS)}"}

    def checks(self):
        return [
            (self.init_from != "", "--init_from (a pretraining checkpoint) is required"),
            *one_of(self, "protocol", ("auto", "encodeval", "standard")),
            (self.protocol != "encodeval" or self.input_format == "paper",
             "--protocol=encodeval writes inputs the authors' way: --input_format=paper"),
            (self.max_len == 0 or self.max_len >= 8, "--max_len must be 0 (auto) or >= 8"),
            (not self.init_from or source_problem("init_from", self.init_from) is None,
             source_problem("init_from", self.init_from)),
            *[(not path or os.path.isfile(path), f"--{name}={path}: no such file")
              for name, path in (("train", self.train), ("val", self.val), ("test", self.test),
                                 ("corpus", self.corpus))],
            (device_problem(self.device) is None, device_problem(self.device)),
            (family_of(self.task) is not None,
             f"--task must be one of {', '.join(FAMILIES)} (with --train/--test), "
             f"{', '.join('demo_' + f for f in FAMILIES)}, or {', '.join(HF_TASKS)}"),
            (self.task not in FAMILIES or (self.train and self.test),
             f"--task={self.task} needs --train and --test files"),
            (self.task in FAMILIES or not (self.train or self.val or self.test),
             "--train/--val/--test are for --task=sc|tc|qa|ir only"),
            (not self.corpus or family_of(self.task) == "ir", "--corpus is for ir tasks only"),
            *at_least(self, 1, "seeds", "batch_size", "max_steps", "max_answer_tokens"),
            *at_least(self, 0, "weight_decay", "doc_stride"),
            (0 <= self.warmup < 1 and 0 < self.val_fraction < 1,
             "--warmup must be in [0, 1), --val_fraction in (0, 1)"),
            (self.grad_clip >= 0, "--grad_clip must be >= 0 (0 = off; a negative bound ascends)"),
            *one_of(self, "pooling", ("mean", "first", "last")),
            *one_of(self, "input_format", INPUT_FORMATS),
            *one_of(self, "weights", ("fp32", "bf16")),
            *one_of(self, "empty_queries", ("skip", "zero")), *above(self, 0, "temperature"),
            *one_of(self, "dtype", ("auto", "bfloat16", "float32")),
            (lrs_problem(self.lrs) is None, lrs_problem(self.lrs)),
        ]

# EncodEval's input length: round(0.99 x max_position_embeddings) of the released models (2,048)
ENCODEVAL_MAX_LEN = 2028

# Settings that do not change a cell's result: a sweep run with other values reuses its cells
NOT_IN_KEY = {"lrs", "seeds", "out_dir", "device", "progress", "save_model", "compile"}

def lrs_problem(text: str) -> str | None:
    try:
        lrs = [float(x) for x in text.split(",")]
    except ValueError:
        return f"--lrs must be comma-separated numbers, got {text!r}"
    if not all(0 < lr < math.inf for lr in lrs) or len(set(lrs)) != len(lrs):
        return f"--lrs must be distinct positive finite numbers, got {text!r}"
    return None

def family_of(task: str) -> str | None:
    if task in HF_TASKS:
        return HF_TASKS[task].family
    name = task.removeprefix("demo_")
    return name if name in FAMILIES else None

# One cell: fine-tune from the checkpoint at one learning rate and seed, then score val and test

def train_cell(family: Family, body, splits: dict, cfg: FinetuneConfig, lr: float,
               seed: int) -> tuple[dict, nn.Module]:
    """Trains body (in place) and a new head in its dtype; returns val/test scores and the head."""
    torch.manual_seed(seed)
    head = family.head(body.config.n_embd).to(family.device, next(body.parameters()).dtype)
    run_body = torch.compile(body, dynamic=True) if cfg.compile else body
    both = nn.ModuleDict({"body": body, "head": head})
    optimizer = configure_optimizer(both, lr, cfg.weight_decay)
    items = splits["train"].items
    epoch = math.ceil(len(items) / cfg.batch_size)
    # standard: at most one epoch; EncodEval: max_steps over epochs (Trainer), CoNLL/UNER one epoch
    steps = epoch if family.one_epoch else cfg.max_steps if cfg.protocol == "encodeval" \
        else min(cfg.max_steps, epoch)
    warmup_steps = math.ceil(cfg.warmup * steps)
    generator = torch.Generator().manual_seed(seed)
    order = [i for _ in range(math.ceil(steps / epoch))
             for i in torch.randperm(len(items), generator=generator).tolist()]
    both.train()
    diverged = None
    for step in tqdm(range(steps), desc=f"lr {lr:g} seed {seed}", leave=False,
                     disable=not (cfg.progress and sys.stderr.isatty())):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr, steps, warmup_steps, steps - warmup_steps)
        loss = family.loss(run_body, head, [items[i] for i in
                                        order[step * cfg.batch_size:(step + 1) * cfg.batch_size]])
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(both.parameters(), cfg.grad_clip or float("inf"))
        if not (torch.isfinite(loss.detach()) and torch.isfinite(grad_norm)):
            # a real outcome at a high learning rate: the cell is scored with its last finite step
            diverged = step
            optimizer.zero_grad(set_to_none=True)  # the body is reused by the next cell
            break
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    both.eval()
    with torch.no_grad():
        scores = {name: {k: 100 * v for k, v in family.evaluate(run_body, head, split).items()}
                  for name, split in splits.items() if name != "train"}
    return {**scores, "steps": steps, "diverged_at": diverged}, head

# The sweep and its report

def sweep(family: Family, body, splits: dict, cfg: FinetuneConfig, key: str) -> list[dict]:
    """Every (lr, seed) cell: from out_dir/results.jsonl, else fine-tuned now."""
    path = os.path.join(cfg.out_dir, "results.jsonl")
    # the torn last line of a sweep killed mid-write is cut: that cell is simply done again
    done = {(r["lr"], r["seed"]): r for r in files.read_json_lines(path, repair=True)
            if r.get("key") == key}
    cells = [(float(lr), seed) for lr in cfg.lrs.split(",") for seed in range(cfg.seeds)]
    todo = [cell for cell in cells if cell not in done]
    print(f"{len(cells) - len(todo)} of {len(cells)} cells already in {path}; "
          f"fine-tuning {len(todo)}")
    initial = {k: v.detach().clone() for k, v in body.state_dict().items()}
    for n, (lr, seed) in enumerate(todo, start=1):
        body.load_state_dict(initial)
        t0 = time.perf_counter()
        result = {"key": key, "lr": lr, "seed": seed,
                  **train_cell(family, body, splits, cfg, lr, seed)[0],
                  "seconds": round(time.perf_counter() - t0, 1)}
        with open(path, "a", encoding="utf-8") as f:
            f.write(files.json_line(result))
        done[lr, seed] = result
        print(f"cell {n}/{len(todo)}: lr {lr:.1e} seed {seed}: val {family.metric} "
              f"{result['val'][family.metric]:.2f}, test {result['test'][family.metric]:.2f} "
              f"({result['seconds']:.0f} s)", flush=True)
    body.load_state_dict(initial)
    return [done[cell] for cell in cells]

def report(results: list[dict], metric: str) -> dict:
    """Per lr, seed means of val and test with 95% intervals; the chosen lr (best val mean, smaller
    on a tie). stability_sd (the paper's 2nd finding): sd of the seed-mean test score over the grid,
    lower = more stable; _converged: over lrs where no seed diverged, lest a few cells decide it."""
    per_lr = []
    for lr in dict.fromkeys(r["lr"] for r in results):
        cells = [r for r in results if r["lr"] == lr]
        val_mean, val_ci = mean_ci([r["val"][metric] for r in cells])
        test_mean, test_ci = mean_ci([r["test"][metric] for r in cells])
        per_lr.append({"lr": lr, "seeds": len(cells), "val_mean": val_mean, "val_ci95": val_ci,
                       "test_mean": test_mean, "test_ci95": test_ci,
                       "diverged": sum(r["diverged_at"] is not None for r in cells)})
    chosen = max(per_lr, key=lambda row: (row["val_mean"], -row["lr"]))
    converged = [row for row in per_lr if not row["diverged"]]
    return {"metric": metric, "per_lr": per_lr, "chosen_lr": chosen["lr"],
            "test_mean": chosen["test_mean"], "test_ci95": chosen["test_ci95"],
            "stability_sd": sd_of([row["test_mean"] for row in per_lr]),
            "stability_sd_converged": sd_of([row["test_mean"] for row in converged]),
            "stability_lrs_converged": [row["lr"] for row in converged]}

def sd_of(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None

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
    n_converged = len(rep["stability_lrs_converged"])
    if n_converged < len(rep["per_lr"]) and rep["stability_sd_converged"] is not None:
        print(f"  over the {n_converged} learning rates where no seed diverged: "
              f"{rep['stability_sd_converged']:.2f} points")
    if "trivial" in rep:  # with one seed there is no interval to compare with
        floor, ci = rep["trivial"]["test"], rep["test_ci95"]
        print(f"a constant prediction ({rep['trivial']['rule']}) scores {floor:.2f} on test"
              + (": the chosen score is within its 95% interval of that, so no learning shows"
                 if ci is not None and abs(rep["test_mean"] - floor) <= ci else ""))
    if rep["test_ci95"] is not None and not 0 <= rep["test_mean"] - rep["test_ci95"] \
            <= rep["test_mean"] + rep["test_ci95"] <= 100:
        print(f"(the interval is wider than the score's range: {rep['per_lr'][0]['seeds']} seeds "
              "are few, and t at their degrees of freedom is large)")

@command
def main(argv: list[str]) -> dict:
    return finetune(configure(FinetuneConfig, argv))

def encode_splits(family: Family, task, cfg: FinetuneConfig) -> tuple[dict, dict]:
    """The encoded train/val/test splits and record counts; val is held out of train if absent."""
    family.check(task.test)
    if task.val is not None:
        family.check(task.val)
        train, val = task.train, task.val
    else:
        train, val = hold_out(task.train, family.name, cfg.val_fraction)
    rows = {"train": train, "val": val, "test": task.test}
    splits = {name: family.encode(r, task.documents[name]) if name in task.documents
              else family.encode(r) for name, r in rows.items()}
    for name in ("val", "test"):  # retrieval: a split that judges nothing relevant scores nothing
        if family.name == "ir" and not any(g > 0 for rel in splits[name].relevance
                                           for g in rel.values()):
            raise ValueError(f"{rows[name][0][0].rsplit(',', 1)[0]}: the {name} split judges no "
                             "document relevant (every grade is 0), so nDCG has nothing to rank")
    return splits, {name: len(r) for name, r in rows.items()}

def finetune(cfg: FinetuneConfig) -> dict:
    named = cfg.task in HF_TASKS  # the paper's: the authors' protocol and length unless told
    cfg = replace(cfg, out_dir=cfg.out_dir or os.path.join("out", "finetune", cfg.task),
                  protocol=cfg.protocol if cfg.protocol != "auto" else
                  "encodeval" if named else "standard",
                  max_len=cfg.max_len or (ENCODEVAL_MAX_LEN if named else 512))
    device, autocast = device_and_autocast(cfg.device, cfg.dtype)
    body, tok, ckpt = load_model(cfg.init_from, device, head=False)  # the LM head goes unused
    # bf16, the authors': AdamW's small updates round away (docs/finetuning.md)
    body = body.to(torch.bfloat16 if cfg.weights == "bf16" else torch.float32)
    # where the demo tasks find their held-out docstrings (hf: bodies have none)
    data_dir = data_dir_of(ckpt["train_config"]) if "train_config" in ckpt else ""
    checkpoint_id = identity(cfg.init_from, ckpt)
    del ckpt  # the body holds the weights
    task = load_task(cfg, data_dir)
    max_len = min(cfg.max_len, body.config.block_size)
    family = family_class(task.family, cfg.protocol)(cfg, tok, task.train, device, autocast,
                                                     max_len, labels=task.labels)
    family.one_epoch = cfg.protocol == "encodeval" and named and HF_TASKS[cfg.task].one_epoch
    splits, counts = encode_splits(family, task, cfg)
    held = "its own" if task.val is not None else f"{cfg.val_fraction:.0%} of train"
    print(f"{cfg.task} ({task.family}): {counts['train']:,} train / {counts['val']:,} validation "
          f"({held}) / {counts['test']:,} test records -> {len(splits['train'].items):,} training "
          f"items; body {cfg.init_from} on {device} in {next(body.parameters()).dtype}, "
          f"max_len {max_len}, input format {cfg.input_format}, protocol {cfg.protocol}")
    # a cell is reused only when settings, weights and data are the same; files count by content
    paths = {"init_from", "train", "val", "test", "corpus"}
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_KEY | paths}
    records = [[r for _, r in rows] if rows is not None else None
               for rows in (task.train, task.val, task.test)]  # not where they were read
    fingerprint = json.dumps([settings, checkpoint_id, records, task.documents], sort_keys=True)
    key = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    # one sweep at a time in an out_dir: two would interleave results.jsonl
    with files.exclusive(cfg.out_dir, f"fine-tuning in {cfg.out_dir}"):
        results = sweep(family, body, splits, cfg, key)
        rep = {"task": cfg.task, "family": task.family, "init_from": cfg.init_from,
               "checkpoint_id": checkpoint_id, "key": key, **report(results, family.metric)}
        if family.trivial_rule:
            rep["trivial"] = {"rule": family.trivial_rule,
                              "test": 100 * family.trivial(splits["test"])[family.metric]}
        if cfg.save_model:
            rep["saved_model"] = save_model(family, body, splits, cfg, results, rep, tok)
        rep["settings"] = asdict(cfg)
        print_report(rep)
        path = os.path.join(cfg.out_dir, "report.json")
        files.write_text_atomically(path, json.dumps(files.strict(rep), indent=1))
    print(f"wrote {path}")
    return rep

def save_model(family: Family, body, splits: dict, cfg: FinetuneConfig, results: list[dict],
               rep: dict, tok) -> dict:
    """Trains the chosen lr's best-val cell again (sweeps keep no weights) into out_dir/model.pt."""
    cells = [r for r in results if r["lr"] == rep["chosen_lr"]]
    best = max(cells, key=lambda r: (r["val"][family.metric], -r["seed"]))
    print(f"saving the model: training lr {best['lr']:.1e} seed {best['seed']} again")
    result, head = train_cell(family, body, splits, cfg, best["lr"], best["seed"])
    finetuned = {"task": cfg.task, "family": family.name, **family.export(),
                 "pooling": cfg.pooling, "input_format": cfg.input_format,
                 "head": dict(head.state_dict()), "lr": best["lr"], "seed": best["seed"],
                 "val": result["val"], "test": result["test"], "source": cfg.init_from,
                 "causal": cfg.causal, "max_len": family.max_len}
    path = os.path.join(cfg.out_dir, "model.pt")
    save_checkpoint(checkpoint_payload(body, tokenizer=tok.meta(), finetuned=finetuned, step=0),
                    path)
    if result["test"] != best["test"]:  # nondeterministic GPU kernels can differ a little
        print(f"note: the saved model scores {result['test']} on test; the sweep's cell scored "
              f"{best['test']}")
    return {"path": path, "lr": best["lr"], "seed": best["seed"], "val": result["val"],
            "test": result["test"]}

if __name__ == "__main__":
    main(sys.argv[1:])
