"""The paper's experiment at small scale in one command, and the table and figures of any
experiment: several pretraining runs, each fine-tuned on several tasks, reported as the paper does.

    python experiment.py                            # the CPU experiment (about half an hour)
    python experiment.py --jobs=4 --out_dir=out/exp4
    python experiment.py --summarize=out/exp        # the table and figures of out/exp only

What runs, how it resumes, and the results: docs/experiment.md.
"""

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
from mlm_vs_clm.settings import at_least, check, command, configure, explicit_keys, parse_value
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
                          "ft_batch_size", "ft_steps"), *at_least(self, 0, "warmup_steps"),
                (self.warmup_steps + self.decay_steps <= self.steps,
                 f"--warmup_steps={self.warmup_steps} + --decay_steps={self.decay_steps} must fit "
                 f"in --steps={self.steps}"),
                (max(1, self.cpt_steps // 100) + self.decay_steps <= self.cpt_steps,
                 f"--decay_steps={self.decay_steps} and a 1% warmup must fit in "
                 f"--cpt_steps={self.cpt_steps}")]

# --quick: the design at a size that runs in a few minutes on 2 cores (docs/experiment.md)
QUICK = dict(steps=60, warmup_steps=6, decay_steps=12, cpt_steps=30, eval_interval=10,
             tasks="sc,ir", lrs="3e-3,1e-2", ft_steps=20, keep="30", keep_tasks="sc")


def read_run(ckpt_path: str) -> dict:
    """A train.py run: its settings (from the checkpoint; mmap reads them without loading the
    weights), its validation losses, and the report.json of every sweep in a subdirectory of its
    out_dir, matched to ckpt.pt or a ckpt_<step>.pt by the checkpoint's identity, not its path:
    an experiment can be moved or copied."""
    run_dir = os.path.dirname(ckpt_path)
    ckpt = read_checkpoint(ckpt_path)
    if "train_config" not in ckpt:
        raise ValueError(f"{ckpt_path} has no train_config: not written by train.py")
    evals = [r for r in files.read_json_lines(os.path.join(run_dir, "log.jsonl")) if "val_clm" in r]
    steps = {identity(ckpt_path, ckpt): None}  # checkpoint identity -> step (None: the final one)
    for kept in glob.glob(os.path.join(run_dir, "ckpt_*.pt")):
        step = read_checkpoint(kept)
        steps[identity(kept, step)] = step["step"]
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
    return {"name": os.path.basename(run_dir), "ckpt": ckpt_path, "config": ckpt["train_config"],
            "model_config": ckpt["model_config"], "global_batch": ckpt.get("global_batch"),
            "id": next(iter(steps)), "source_id": ckpt.get("source_id"), "evals": evals,
            "reports": reports, "by_step": by_step}

def describe_runs(runs: list[dict]) -> list[dict]:
    """Each run's pretraining in words ("CLM 100 -> MLM 300"), its CPT source (the run whose
    checkpoint it started from, if any) and its share of CLM steps; sorted as the paper's tables
    are: CLM first, then more and more MLM, then continued pretraining."""
    by_id = {r["id"]: r for r in runs}
    for run in runs:
        cfg = SimpleNamespace(**run["config"])
        switch = switch_step(cfg.switch_to, cfg.switch_at, cfg.max_steps)
        phases = [(cfg.objective, cfg.max_steps)] if switch is None else \
            [(cfg.objective, switch), (cfg.switch_to, cfg.max_steps - switch)]
        run["pretraining"] = " -> ".join(f"{objective.upper()} {steps}"
                                         for objective, steps in phases)
        run["clm_share"] = sum(steps for objective, steps in phases
                               if objective == "clm") / cfg.max_steps
        run["source"] = None
        if cfg.init_from not in ("scratch", "resume"):
            source = by_id.get(run["source_id"])
            run["source"] = source
            run["pretraining"] = (f"{source['name'] if source else cfg.init_from} + "
                                  f"{run['pretraining']}")
    depth = lambda run: 0 if run["source"] is None else 1 + depth(run["source"])  # noqa: E731
    return sorted(runs, key=lambda run: (depth(run), -run["clm_share"], run["name"]))

def summary_tables(runs: list[dict]) -> tuple[list[str], str]:
    """The tasks, and two markdown tables: the test score at the learning rate chosen on validation
    (mean ± 95% CI over seeds) per run and task, as the paper reports; then the stability figure
    (sd across the learning-rate grid, points; its mean also over the learning rates where no seed
    diverged) and the final validation losses of pretraining."""
    family = {t: r["reports"][t]["family"] for r in runs for t in r["reports"]}
    tasks = sorted(family, key=lambda t: (list(FAMILIES).index(family[t]), t))
    metric = {t: next(r["reports"][t]["metric"] for r in runs if t in r["reports"]) for t in tasks}

    def row(cells):
        return "| " + " | ".join(cells) + " |"

    # over every task, or none: a mean over fewer tasks would not compare with the others
    def mean_of(values):
        return "-" if not values or None in values else f"{statistics.mean(values):.2f}"

    scores = [row(["run", "pretraining"] + [f"{t} {metric[t]}" for t in tasks] + ["mean"]),
              row(["---"] * (len(tasks) + 3))]
    stability = [row(["run"] + [t for t in tasks] + ["mean", "mean, lrs with no divergence",
                                                      "final val CLM", "final val MLM"]),
                 row(["---"] * (len(tasks) + 5))]
    for run in runs:
        reps = [run["reports"].get(t) for t in tasks]
        scores.append(row([run["name"], run["pretraining"]]
                          + [("-" if rep is None else f"{rep['test_mean']:.2f}"
                              + (f" ± {rep['test_ci95']:.2f}" if rep["test_ci95"] is not None
                                 else "")) for rep in reps]
                          + [mean_of([rep and rep["test_mean"] for rep in reps])]))
        sds = [rep and rep["stability_sd"] for rep in reps]
        converged = [rep and rep.get("stability_sd_converged") for rep in reps]
        last = run["evals"][-1] if run["evals"] else {}
        stability.append(row([run["name"]] + ["-" if sd is None else f"{sd:.2f}" for sd in sds]
                             + [mean_of(sds), mean_of(converged)]
                             + [f"{last[k]:.4f}" if k in last else "-"
                                for k in ("val_clm", "val_mlm")]))
    tables = "\n".join(scores) + "\n\n" + "\n".join(stability)
    efficiency = efficiency_table(runs)
    return tasks, tables + ("\n\n" + efficiency if efficiency else "")

def efficiency_table(runs: list[dict]) -> str:
    """The paper's data-efficiency view: the test score (at the learning rate chosen on
    validation) of checkpoints taken along a run, against the tokens it had seen; "" when no
    intermediate checkpoint was fine-tuned."""
    curves = [run for run in runs if run["by_step"]]
    if not curves:
        return ""
    tasks = sorted({t for run in curves for reps in run["by_step"].values() for t in reps})
    lines = ["| run | step | tokens | " + " | ".join(tasks) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in tasks) + " |"]
    for run in curves:
        cfg = run["config"]
        tokens_per_step = ((cfg.get("total_batch_size") or cfg["batch_size"]) * cfg["block_size"])
        for step in sorted(run["by_step"]):
            reps = run["by_step"][step]
            lines.append(f"| {run['name']} | {step} | {step * tokens_per_step:,} | " + " | ".join(
                f"{reps[t]['test_mean']:.2f}" if t in reps else "-" for t in tasks) + " |")
    return "\n".join(lines)

def draw_figures(runs: list[dict], tasks: list[str], out_dir: str) -> list[str]:
    """Two PNGs: the validation losses of both objectives over pretraining for every run (a
    continued-pretraining run drawn after its source's steps; a dotted line where the objective
    changes), and the test score against the learning rate per task: the seed mean as a line, each
    seed as a dot (with a few seeds, the dots say more than a t interval, which is wide)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: --figures needs matplotlib: pip install matplotlib") from None
    os.makedirs(out_dir, exist_ok=True)
    colors = {run["name"]: f"C{i}" for i, run in enumerate(runs)}

    def offset(run):  # the step a run's step 0 stands at: after everything its source ran
        return (0 if run["source"] is None
                else offset(run["source"]) + run["source"]["config"]["max_steps"])

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, key, title in zip(axes, ("val_clm", "val_mlm"),
                              ("validation CLM loss", "validation MLM loss")):
        for run in runs:
            start = offset(run)
            ax.plot([start + e["step"] for e in run["evals"]], [e[key] for e in run["evals"]],
                    color=colors[run["name"]], label=f"{run['name']}: {run['pretraining']}")
            cfg = SimpleNamespace(**run["config"])
            switch = switch_step(cfg.switch_to, cfg.switch_at, cfg.max_steps)
            changes = [start + s for s in (switch, 0 if run["source"] else None)
                       if s is not None]
            for x in changes:
                ax.axvline(x, color=colors[run["name"]], linestyle=":", linewidth=1)
        ax.set(title=title, xlabel="pretraining step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (nats per token)")
    fig.legend(*axes[0].get_legend_handles_labels(),
               loc="lower center", ncol=4, fontsize=8)  # below: curves fill both
    fig.tight_layout(rect=(0, 0.06 * math.ceil(len(runs) / 4), 1, 1))
    losses = os.path.join(out_dir, "experiment_losses.png")
    fig.savefig(losses, dpi=120)
    plt.close(fig)

    if not tasks:  # no sweeps yet: the losses are all there is to draw
        return [losses]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        reports = [(run, run["reports"][task]) for run in runs if task in run["reports"]]
        for run, rep in reports:
            ax.plot([row["lr"] for row in rep["per_lr"]],
                    [row["test_mean"] for row in rep["per_lr"]],
                    color=colors[run["name"]], marker="o", label=run["name"])
            ax.scatter([c["lr"] for c in rep["cells"]],
                       [c["test"][rep["metric"]] for c in rep["cells"]],
                       color=colors[run["name"]], s=10, alpha=0.4)
        ax.set(xscale="log", title=task, xlabel="fine-tuning learning rate",
               ylabel=f"test {reports[0][1]['metric']}")
        lrs = sorted({row["lr"] for _, rep in reports for row in rep["per_lr"]})
        ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    sweep_path = save_figure(plt, fig, axes, os.path.join(out_dir, "experiment_lr.png"))
    efficiency = [draw_efficiency(plt, runs, colors, out_dir, by_flops)
                  for by_flops in (False, True)]
    return [losses, sweep_path] + [path for path in efficiency if path]

def draw_efficiency(plt, runs: list[dict], colors: dict, out_dir: str,
                    by_flops: bool) -> str | None:
    """The data-efficiency figures: per task, the test score of each checkpoint fine-tuned along a
    run (the seed mean, with each seed as a dot) against its pretraining step, or against the
    training FLOPs spent to reach it (the paper's Fig. 10)."""
    curves = [run for run in runs if run["by_step"]]
    tasks = sorted({t for run in curves for reps in run["by_step"].values() for t in reps})
    if not tasks:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for run in curves:
            points = [(training_flops(run, step) if by_flops else step, reps[task])
                      for step, reps in sorted(run["by_step"].items()) if task in reps]
            ax.plot([step for step, _ in points], [rep["test_mean"] for _, rep in points],
                    color=colors[run["name"]], marker="o", label=run["name"])
            for step, rep in points:
                chosen = [c["test"][rep["metric"]] for c in rep["cells"]
                          if c["lr"] == rep["chosen_lr"]]
                ax.scatter([step] * len(chosen), chosen, color=colors[run["name"]], s=10,
                           alpha=0.4)
        metric = next(reps[task]["metric"] for run in curves for reps in run["by_step"].values()
                      if task in reps)
        ax.set(title=task, xlabel="pretraining FLOPs" if by_flops else "pretraining step",
               ylabel=f"test {metric}", xscale="log" if by_flops else "linear")
        ax.grid(alpha=0.3)
    name = "experiment_flops.png" if by_flops else "experiment_steps.png"
    return save_figure(plt, fig, axes, os.path.join(out_dir, name))

def training_flops(run: dict, step: int) -> float:
    """The FLOPs of a run's first `step` steps, counted as MFU counts them (model.py's
    flops_per_token: 6 per weight a token meets, plus attention; MLM's head on its masked share)."""
    cfg = SimpleNamespace(**run["config"])
    with torch.device("meta"):
        model = Transformer(ModelConfig(**run["model_config"]))
    switch = switch_step(cfg.switch_to, cfg.switch_at, cfg.max_steps)
    tokens = (run["global_batch"] or cfg.total_batch_size or cfg.batch_size) * cfg.block_size
    phases = [(cfg.objective, min(step, switch if switch is not None else step)),
              (cfg.switch_to, max(0, step - switch) if switch is not None else 0)]
    return sum(n * tokens * model.flops_per_token(cfg.block_size, objective == "clm",
                                                  1.0 if objective == "clm" else cfg.mask_ratio)
               for objective, n in phases if n)

def save_figure(plt, fig, axes, path: str) -> str:
    """A row of per-task panels, the legend in the last one."""
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

def summarize(directory: str, figures_dir: str = "") -> dict:
    """--summarize=DIR: the table (printed, and DIR/summary.md) and figures of every run in DIR."""
    paths = sorted(glob.glob(os.path.join(directory, "*", "ckpt.pt")))
    if not paths:
        raise SystemExit(f"error: no run in {directory}: expected train.py out_dirs "
                         f"{directory}/<run>/ckpt.pt")
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
    return {"runs": [run["name"] for run in runs], "tasks": tasks, "tables": tables,
            "figures": figures}

# ----------------------------------------------------------------------------------------------
# The CPU experiment, end to end

# name: (train.py settings of the run, the run it continues, or None)
RUNS = {
    "clm": (["--objective=clm", "--switch_to=none"], None),
    "mlm": (["--objective=mlm", "--switch_to=none"], None),
    "clm25-mlm": (["--switch_at=0.25"], None),
    "clm50-mlm": (["--switch_at=0.5"], None),
    "clm75-mlm": (["--switch_at=0.75"], None),
    "clm-cpt": (["--objective=mlm", "--switch_to=none"], "clm"),
    "mlm-cpt": (["--objective=mlm", "--switch_to=none"], "mlm"),
}
KEPT = ("clm", "mlm")  # the runs whose intermediate checkpoints draw the data-efficiency figure

def run_command(args: list[str], log_path: str) -> None:
    """One python process of the experiment, its output in log_path; stops the experiment with the
    log's last line if it fails. The process dies with the experiment (settings.command)."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               MLM_VS_CLM_PARENT=str(os.getpid()))
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), args[0])
    with open(log_path, "w") as log:
        code = subprocess.call([sys.executable, script, *args[1:]], stdout=log,
                               stderr=subprocess.STDOUT, env=env)
    if code != 0:
        with open(log_path) as log:
            last = (log.read().strip().splitlines() or ["(no output)"])[-1]
        raise ValueError(f"{' '.join(args[:1])} failed (exit {code}); see {log_path}: {last}")

def train_args(name: str, cfg: ExperimentConfig) -> list[str]:
    """The train.py settings of one run of the experiment."""
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
    """A run already in the experiment's directory must have the settings asked for now: one of
    other settings is neither reused nor trained over."""
    saved = read_checkpoint(ckpt_path).get("train_config", {})
    for arg in args:
        key, _, value = arg[2:].partition("=")
        if key != "init_from" and key in saved and parse_value(type(saved[key]), value) \
                != saved[key]:
            raise ValueError(f"{os.path.dirname(ckpt_path)} was trained with --{key}="
                             f"{saved[key]}, not {value}: use another --out_dir, or delete that "
                             "run to train it again")

def pretrain(name: str, cfg: ExperimentConfig, after=None) -> None:
    """One pretraining run, once the run it continues (the future `after`) is done: kept when it is
    finished with these settings, resumed when interrupted, else trained."""
    if after is not None:
        after.result()
    run_dir, args = os.path.join(cfg.out_dir, name), train_args(name, cfg)
    ckpt = os.path.join(run_dir, "ckpt.pt")
    if os.path.exists(ckpt):
        check_same(ckpt, args)
        summary = os.path.join(run_dir, "summary.json")
        if os.path.exists(summary) and files.read_json(summary).get("steps") == \
                files.read_json(summary).get("max_steps"):
            print(f"{name}: kept (finished, the same settings)", flush=True)
            return
        args = ["--init_from=resume"]
    print(f"{name}: {'resuming' if args == ['--init_from=resume'] else 'pretraining'}",
          flush=True)
    t0 = time.perf_counter()
    run_command(["train.py", *args, f"--out_dir={run_dir}", "--progress=False"],
                os.path.join(cfg.out_dir, f"{name}.log"))
    print(f"{name}: pretrained in {time.perf_counter() - t0:.0f} s", flush=True)

def sweep(name: str, task: str, cfg: ExperimentConfig, step: int | None = None) -> None:
    """A learning-rate x seed sweep of one run (or of its checkpoint at `step`) on one demo task;
    cells already done are reused."""
    ckpt = "ckpt.pt" if step is None else f"ckpt_{step}.pt"
    out = os.path.join(cfg.out_dir, name, f"demo_{task}" if step is None else
                       f"step{step}_demo_{task}")
    os.makedirs(out, exist_ok=True)
    run_command(["finetune.py", f"--init_from={os.path.join(cfg.out_dir, name, ckpt)}",
                 f"--task=demo_{task}", f"--lrs={cfg.lrs}", f"--seeds={cfg.seeds}",
                 f"--batch_size={cfg.ft_batch_size}", f"--max_steps={cfg.ft_steps}",
                 "--progress=False", f"--out_dir={out}"], os.path.join(out, "log.txt"))

def run_experiment(cfg: ExperimentConfig) -> dict:
    os.makedirs(cfg.out_dir, exist_ok=True)
    t0 = time.perf_counter()
    # Every run reads the same blocks in the same order (seed 0); the first to start prepares the
    # data, the others wait for it.
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
    return summarize(cfg.out_dir, figures_dir(cfg, cfg.out_dir))

@command
def main(argv: list[str]) -> dict:
    cfg = configure(ExperimentConfig, argv)
    if cfg.quick:
        given = explicit_keys(argv)
        cfg = replace(cfg, **{k: v for k, v in QUICK.items() if k not in given})
        check(cfg)
    if cfg.summarize:
        return summarize(cfg.summarize, figures_dir(cfg, cfg.summarize))
    return run_experiment(cfg)

def figures_dir(cfg: ExperimentConfig, directory: str) -> str:
    if cfg.figures != "auto":
        return cfg.figures
    if importlib.util.find_spec("matplotlib") is None:
        print("note: no figures (pip install matplotlib to draw them)")
        return ""
    return directory

if __name__ == "__main__":
    main(sys.argv[1:])
