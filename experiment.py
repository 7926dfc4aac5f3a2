"""The paper's experiment at small scale in one command (about half an hour on 2 cores; --quick: a
few minutes), reported as the paper does; --summarize=DIR reports any. docs/experiment.md."""

import glob
import importlib.util
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch

from mlm_vs_clm import files
from mlm_vs_clm.checkpoints import identity, read_checkpoint
from mlm_vs_clm.settings import (at_least, check, command, configure, explicit_keys, optional,
                                 parse_value)
from mlm_vs_clm.task_data import FAMILIES
from model import ModelConfig, Transformer
from objectives import switch_step

@dataclass
class ExperimentConfig:
    out_dir: str = "out/exp"  # one train.py out_dir per run below it, each with its sweeps
    figures: str = "auto"  # figures dir; auto: the experiment's, if matplotlib is there; "": none
    summarize: str = ""  # only summarize this directory of runs (any experiment's), run nothing
    jobs: int = 2  # processes at a time, one thread each (one per core)
    quick: bool = False  # the same design in a few minutes: QUICK's settings, unless given here
    steps: int = 400  # pretraining steps of every run (8 x 128 tokens a step)
    warmup_steps: int = 20  # pretraining warmup (continued pretraining: 1% of its steps)
    decay_steps: int = 40  # the decay at the end of every run, continued pretraining too
    cpt_steps: int = 200  # continued pretraining: MLM steps added to the decayed CLM and MLM runs
    eval_interval: int = 20  # pretraining steps between validations (the loss curves)
    tasks: str = "sc,tc,qa,ir"  # demo tasks to fine-tune every run on (demo_<family>); "" = none
    lrs: str = "1e-3,3e-3,1e-2"  # fine-tuning learning-rate grid
    seeds: int = 2  # fine-tuning seeds at each learning rate
    ft_batch_size: int = 16  # fine-tuning batch
    ft_steps: int = 40  # fine-tuning steps per cell (640 examples at batch 16)
    keep: str = "100,200"  # clm and mlm steps also fine-tuned (data efficiency); "" = none
    keep_tasks: str = "sc,tc,ir"  # demo tasks of those checkpoints (demo_qa sits at its floor)

    def checks(self):
        return [*at_least(self, 1, "jobs", "steps", "cpt_steps", "seeds", "eval_interval",
                          "ft_batch_size", "ft_steps"),
                *at_least(self, 0, "warmup_steps", "decay_steps"),
                (self.warmup_steps + self.decay_steps <= self.steps,
                 f"--warmup_steps={self.warmup_steps} + --decay_steps={self.decay_steps} must fit "
                 f"in --steps={self.steps}"),
                (max(1, self.cpt_steps // 100) + self.decay_steps <= self.cpt_steps,
                 f"--decay_steps={self.decay_steps} and a 1% warmup must fit in "
                 f"--cpt_steps={self.cpt_steps}")]

QUICK = dict(out_dir="out/exp-quick", steps=60, warmup_steps=6, decay_steps=12, cpt_steps=30,
             eval_interval=10, tasks="sc,ir", lrs="3e-3,1e-2", ft_steps=20, keep="30",
             keep_tasks="sc")  # --quick: a few minutes on 2 cores, in its own directory

def read_run(ckpt_path: str) -> dict:
    """A run's settings, val losses and sweeps' report.json, matched to checkpoints by identity."""
    run_dir, ckpt = os.path.dirname(ckpt_path), read_checkpoint(ckpt_path)
    if "train_config" not in ckpt:
        raise ValueError(f"{ckpt_path} has no train_config: not written by train.py")
    evals = [r for r in files.read_json_lines(os.path.join(run_dir, "log.jsonl")) if "val_clm" in r]
    steps = {identity(ckpt_path, ckpt): None}  # checkpoint identity -> step (None: the final one)
    for kept in glob.glob(os.path.join(run_dir, "ckpt_*.pt")):
        kept_ckpt = read_checkpoint(kept)
        steps[identity(kept, kept_ckpt)] = kept_ckpt["step"]
    reports, by_step = {}, {}  # task -> report of ckpt.pt; step -> task -> report of ckpt_<step>.pt
    for path in sorted(glob.glob(os.path.join(run_dir, "*", "report.json"))):
        rep = files.read_json(path, "a report.json of finetune.py")
        if rep.get("checkpoint_id") not in steps:
            raise ValueError(f"{path} fine-tuned {rep.get('init_from')}, not this run's ckpt.pt or "
                             f"one of its ckpt_<step>.pt; move it out of {run_dir}")
        results = files.read_json_lines(os.path.join(os.path.dirname(path), "results.jsonl"))
        rep["cells"] = [r for r in results if r.get("key") == rep["key"]]
        step = steps[rep["checkpoint_id"]]
        (reports if step is None else by_step.setdefault(step, {}))[rep["task"]] = rep
    if by_step and reports:  # the final checkpoint is the last point of the data-efficiency curve
        by_step[ckpt["step"]] = reports
    return {"name": os.path.basename(run_dir), "config": ckpt["train_config"], "evals": evals,
            "model_config": ckpt["model_config"], "global_batch": ckpt.get("global_batch"),
            "id": next(iter(steps)), "source_id": ckpt.get("source_id"), "reports": reports,
            "by_step": by_step}

def phases(run: dict, steps: int | None = None) -> list[tuple[str, int]]:
    """(objective, steps) of a run's first `steps` steps (all of them by default)."""
    cfg = SimpleNamespace(**run["config"])
    steps = cfg.max_steps if steps is None else steps
    switch = switch_step(cfg.switch_to, cfg.switch_at, cfg.max_steps)
    if switch is None:
        return [(cfg.objective, steps)]
    return [(o, n) for o, n in ((cfg.objective, min(steps, switch)),
                                (cfg.switch_to, max(0, steps - switch))) if n]

def describe_runs(runs: list[dict]) -> list[dict]:
    """Each run's pretraining in words ("CLM 100 -> MLM 300"), sorted: CLM, more MLM, then CPT."""
    by_id = {r["id"]: r for r in runs}
    for run in runs:
        run["pretraining"] = " -> ".join(f"{o.upper()} {n}" for o, n in phases(run))
        run["clm_share"] = sum(n for o, n in phases(run) if o == "clm") / run["config"]["max_steps"]
        run["source"] = by_id.get(run["source_id"])
        if run["config"]["init_from"] not in ("scratch", "resume"):
            name = run["source"]["name"] if run["source"] else run["config"]["init_from"]
            run["pretraining"] = f"{name} + {run['pretraining']}"
    depth = lambda run: 0 if run["source"] is None else 1 + depth(run["source"])  # noqa: E731
    return sorted(runs, key=lambda run: (depth(run), -run["clm_share"], run["name"]))

def summary_tables(runs: list[dict]) -> tuple[list[str], str]:
    """The tasks, and markdown tables: test scores (mean ± 95% CI), stability, data efficiency."""
    family = {t: r["reports"][t]["family"] for r in runs for t in r["reports"]}
    tasks = sorted(family, key=lambda t: (list(FAMILIES).index(family[t]), t))
    metric = {t: next(r["reports"][t]["metric"] for r in runs if t in r["reports"]) for t in tasks}

    def row(*cells):
        return "| " + " | ".join(cells) + " |"

    def mean_of(values):  # over every task or none: fewer would not compare with the others
        return "-" if not values or None in values else f"{statistics.mean(values):.2f}"

    def score(rep):
        return "-" if rep is None else f"{rep['test_mean']:.2f}" + (
            f" ± {rep['test_ci95']:.2f}" if rep["test_ci95"] is not None else "")
    scores = [row("run", "pretraining", *(f"{t} {metric[t]}" for t in tasks), "mean"),
              row(*["---"] * (len(tasks) + 3))]
    stability = [row("run", *tasks, "mean", "mean, lrs with no divergence", "final val CLM",
                     "final val MLM"), row(*["---"] * (len(tasks) + 5))]
    efficiency = [row("run", "step", "tokens", *tasks), row(*["---"] * (len(tasks) + 3))]
    for run in runs:
        reps = [run["reports"].get(t) for t in tasks]
        scores.append(row(run["name"], run["pretraining"], *map(score, reps),
                          mean_of([rep and rep["test_mean"] for rep in reps])))
        sds = [rep and rep["stability_sd"] for rep in reps]
        converged = [rep and rep.get("stability_sd_converged") for rep in reps]
        last = run["evals"][-1] if run["evals"] else {}
        losses = [f"{last[k]:.4f}" if k in last else "-" for k in ("val_clm", "val_mlm")]
        stability.append(row(run["name"], *("-" if sd is None else f"{sd:.2f}" for sd in sds),
                             mean_of(sds), mean_of(converged), *losses))
        for step, by_task in sorted(run["by_step"].items()):
            efficiency.append(row(run["name"], str(step), f"{step * tokens_per_step(run):,}",
                                  *(f"{by_task[t]['test_mean']:.2f}" if t in by_task else "-"
                                    for t in tasks)))
    tables = [scores, stability] + ([efficiency] if len(efficiency) > 2 else [])
    return tasks, "\n\n".join("\n".join(table) for table in tables)

def tokens_per_step(run: dict) -> int:
    cfg = run["config"]
    return (run["global_batch"] or cfg["total_batch_size"] or cfg["batch_size"]) * cfg["block_size"]

def training_flops(run: dict, step: int) -> float:
    """The FLOPs of a run's first `step` steps, as MFU counts them (model.py's flops_per_token)."""
    with torch.device("meta"):
        model = Transformer(ModelConfig(**run["model_config"]))
    cfg = SimpleNamespace(**run["config"])
    return sum(n * tokens_per_step(run) * model.flops_per_token(cfg.block_size, o == "clm",
               1.0 if o == "clm" else cfg.mask_ratio) for o, n in phases(run, step))

def draw_figures(runs: list[dict], tasks: list[str], out_dir: str) -> list[str]:
    """Val losses; per task, test score by lr, step and FLOPs (Fig. 10): seed mean, seed dots."""
    optional("matplotlib", "--figures").use("Agg")  # files only: no display needed
    plt = optional("matplotlib.pyplot", "--figures")
    os.makedirs(out_dir, exist_ok=True)
    color = {run["name"]: f"C{i}" for i, run in enumerate(runs)}

    def offset(run):  # the step a run's step 0 stands at: after everything its source ran
        return 0 if run["source"] is None else offset(run["source"]) + \
            run["source"]["config"]["max_steps"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, key in zip(axes, ("val_clm", "val_mlm")):
        for run in runs:
            start = offset(run)
            ax.plot([start + e["step"] for e in run["evals"]], [e[key] for e in run["evals"]],
                    color=color[run["name"]], label=f"{run['name']}: {run['pretraining']}")
            steps = phases(run)  # a dotted line where a source's steps or the first phase end
            for x in [start] * bool(run["source"]) + [start + steps[0][1]] * (len(steps) > 1):
                ax.axvline(x, color=color[run["name"]], linestyle=":", linewidth=1)
        ax.set(title=f"validation {key[4:].upper()} loss", xlabel="pretraining step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (nats per token)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.06 * math.ceil(len(runs) / 4), 1, 1))
    paths = [os.path.join(out_dir, "experiment_losses.png")]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    def panels(name, points, xlabel, xscale="linear"):  # per task: each run's (x, report, cells)
        shown = [t for t in tasks if any(points(run, t) for run in runs)]
        if not shown:
            return
        fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.8), squeeze=False)
        for ax, task in zip(axes[0], shown):
            for run in runs:
                if found := points(run, task):
                    ax.plot([x for x, _, _ in found], [rep["test_mean"] for _, rep, _ in found],
                            color=color[run["name"]], marker="o", label=run["name"])
                    ax.scatter(*zip(*[(x, c) for x, _, cells in found for c in cells]),
                               color=color[run["name"]], s=10, alpha=0.4)
            metric = next(rep["metric"] for run in runs for _, rep, _ in points(run, task))
            ax.set(title=task, xlabel=xlabel, ylabel=f"test {metric}", xscale=xscale)
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path := os.path.join(out_dir, name), dpi=120)
        plt.close(fig)
        paths.append(path)

    def lr_points(run, task):
        rep = run["reports"].get(task)
        return [(row["lr"], {**rep, "test_mean": row["test_mean"]},
                 [c["test"][rep["metric"]] for c in rep["cells"] if c["lr"] == row["lr"]])
                for row in rep["per_lr"]] if rep else []

    def step_points(run, task, flops=False):
        return [(training_flops(run, step) if flops else step, by_task[task],
                 [c["test"][by_task[task]["metric"]] for c in by_task[task]["cells"]
                  if c["lr"] == by_task[task]["chosen_lr"]])
                for step, by_task in sorted(run["by_step"].items()) if task in by_task]
    panels("experiment_lr.png", lr_points, "fine-tuning learning rate", "log")
    panels("experiment_steps.png", step_points, "pretraining step")
    panels("experiment_flops.png", lambda run, task: step_points(run, task, flops=True),
           "pretraining FLOPs")
    return paths

def summarize(directory: str, figures_dir: str = "") -> dict:
    """--summarize=DIR: the table (printed, and DIR/summary.md) and figures of every run in DIR."""
    paths = sorted(glob.glob(os.path.join(directory, "*", "ckpt.pt")))
    if not paths:
        raise SystemExit(f"error: no run in {directory}: expected train.py out_dirs <run>/ckpt.pt")
    try:
        runs = describe_runs([read_run(p) for p in paths])
    except KeyError as e:
        raise ValueError(f"a checkpoint or report.json under {directory} lacks the field {e}: "
                         "not written by this project?") from None
    tasks, tables = summary_tables(runs)
    print(tables)
    files.write_text_atomically(os.path.join(directory, "summary.md"), tables + "\n")
    figures = draw_figures(runs, tasks, figures_dir) if figures_dir else []
    for path in [os.path.join(directory, "summary.md"), *figures]:
        print(f"wrote {path}")
    return {"runs": [r["name"] for r in runs], "tasks": tasks, "tables": tables, "figures": figures}

# The CPU experiment, end to end
# name: (train.py settings of the run, the run it continues, or None)
RUNS = {"clm": (["--objective=clm", "--switch_to=none"], None),
        "mlm": (["--objective=mlm", "--switch_to=none"], None),
        "clm25-mlm": (["--switch_at=0.25"], None),
        "clm50-mlm": (["--switch_at=0.5"], None),
        "clm75-mlm": (["--switch_at=0.75"], None),
        "clm-cpt": (["--objective=mlm", "--switch_to=none"], "clm"),
        "mlm-cpt": (["--objective=mlm", "--switch_to=none"], "mlm")}
KEPT = ("clm", "mlm")  # the runs whose intermediate checkpoints draw the data-efficiency figure

def run_command(args: list[str], log_path: str) -> None:
    """Runs a script, output in log_path; fails with its last line; dies with the experiment."""
    env = {"OMP_NUM_THREADS": "1", **os.environ, "MLM_VS_CLM_PARENT": str(os.getpid())}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), args[0])
    with open(log_path, "w") as log:
        code = subprocess.call([sys.executable, script, *args[1:]], stdout=log,
                               stderr=subprocess.STDOUT, env=env)
    if code != 0:
        with open(log_path) as log:
            last = (log.read().strip().splitlines() or ["(no output)"])[-1]
        raise ValueError(f"{' '.join(args[:1])} failed (exit {code}); see {log_path}: {last}")

def train_args(name: str, cfg: ExperimentConfig) -> list[str]:
    settings, source = RUNS[name]
    steps = cfg.cpt_steps if source else cfg.steps
    args = [f"--max_steps={steps}", f"--eval_interval={cfg.eval_interval}",
            f"--decay_steps={cfg.decay_steps}", *settings,
            # config/cpt.py's schedule: a new warmup of 1% of the budget, the runs' decay
            f"--warmup_steps={max(1, steps // 100) if source else cfg.warmup_steps}"]
    if source:
        args.append(f"--init_from={os.path.join(cfg.out_dir, source, 'ckpt.pt')}")
    if name in KEPT and cfg.keep:
        args.append(f"--keep_checkpoints={cfg.keep}")
    return args

def check_same(ckpt_path: str, args: list[str]) -> None:
    """A run already there must have the settings asked for now: neither reused nor trained over."""
    saved = read_checkpoint(ckpt_path).get("train_config", {})
    for arg in args:
        key, _, value = arg[2:].partition("=")
        if key != "init_from" and key in saved and parse_value(type(saved[key]), value) \
                != saved[key]:
            raise ValueError(f"{os.path.dirname(ckpt_path)} was trained with --{key}="
                             f"{saved[key]}, not {value}: use another --out_dir or delete that run")

def pretrain(name: str, cfg: ExperimentConfig, after=None) -> None:
    """A run once `after` (its source) is done: kept if finished, resumed if cut short, else run."""
    if after is not None:
        after.result()
    run_dir, args = os.path.join(cfg.out_dir, name), train_args(name, cfg)
    ckpt, summary = os.path.join(run_dir, "ckpt.pt"), os.path.join(run_dir, "summary.json")
    what = "pretraining"
    if os.path.exists(ckpt):
        check_same(ckpt, args)
        done = files.read_json(summary) if os.path.exists(summary) else {}
        if done and done.get("steps") == done.get("max_steps"):
            print(f"{name}: kept (finished, the same settings)\n", end="", flush=True)
            return
        args, what = ["--init_from=resume"], "resuming"
    print(f"{name}: {what}\n", end="", flush=True)  # one write a line: two threads print at once
    t0 = time.perf_counter()
    run_command(["train.py", *args, f"--out_dir={run_dir}", "--progress=False"],
                os.path.join(cfg.out_dir, f"{name}.log"))
    print(f"{name}: pretrained in {time.perf_counter() - t0:.0f} s\n", end="", flush=True)

def sweep(name: str, task: str, cfg: ExperimentConfig, step: int | None = None) -> None:
    """One run's (or its ckpt_<step>.pt's) lr x seed sweep on a demo task; done cells are reused."""
    ckpt, prefix = ("ckpt.pt", "") if step is None else (f"ckpt_{step}.pt", f"step{step}_")
    out = os.path.join(cfg.out_dir, name, f"{prefix}demo_{task}")
    os.makedirs(out, exist_ok=True)
    run_command(["finetune.py", f"--init_from={os.path.join(cfg.out_dir, name, ckpt)}",
                 f"--task=demo_{task}", f"--lrs={cfg.lrs}", f"--seeds={cfg.seeds}",
                 f"--batch_size={cfg.ft_batch_size}", f"--max_steps={cfg.ft_steps}",
                 "--progress=False", f"--out_dir={out}"], os.path.join(out, "log.txt"))
    print(f"{name}: {prefix}demo_{task} fine-tuned ({out}/report.json)\n", end="", flush=True)

def run_experiment(cfg: ExperimentConfig) -> None:
    os.makedirs(cfg.out_dir, exist_ok=True)
    t0 = time.perf_counter()
    # every run reads the same blocks in the same order; the first prepares them, the others wait
    with ThreadPoolExecutor(cfg.jobs) as pool:
        runs = {}
        for name, (_, source) in RUNS.items():  # a source comes before the runs that continue it
            runs[name] = pool.submit(pretrain, name, cfg, runs.get(source))
        for future in runs.values():
            future.result()
        print(f"pretraining done ({time.perf_counter() - t0:.0f} s)")
        sweeps = [pool.submit(sweep, name, task, cfg) for name in RUNS
                  for task in cfg.tasks.split(",") if task]
        sweeps += [pool.submit(sweep, name, task, cfg, int(step)) for name in KEPT
                   for step in cfg.keep.split(",") if step
                   for task in cfg.keep_tasks.split(",") if task]
        for future in sweeps:
            future.result()
    print(f"fine-tuning done ({time.perf_counter() - t0:.0f} s)")

@command
def main(argv: list[str]) -> dict:
    cfg = configure(ExperimentConfig, argv)
    if cfg.quick:
        cfg = replace(cfg, **{k: v for k, v in QUICK.items() if k not in explicit_keys(argv)})
        check(cfg)
    if not cfg.summarize:
        run_experiment(cfg)
    directory, figures = cfg.summarize or cfg.out_dir, cfg.figures
    if figures == "auto" and importlib.util.find_spec("matplotlib") is None:
        print("note: no figures (pip install matplotlib to draw them)")
        figures = ""
    return summarize(directory, directory if figures == "auto" else figures)

if __name__ == "__main__":
    main(sys.argv[1:])
