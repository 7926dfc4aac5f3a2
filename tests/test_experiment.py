"""
An experiment (experiment.py, and its --summarize): the summary table and figures of several
pretraining runs, each fine-tuned.
"""

import importlib.util
import os
import shutil

import pytest

import torch

import experiment
import finetune as ft
import train
from mlm_vs_clm import settings
from mlm_vs_clm.checkpoints import CHECKPOINT_FORMAT
from mlm_vs_clm.settings import parse_value
from tests.helpers import read_log, run_args, sc_files

@pytest.mark.slow
def test_experiment_summary_table_and_figures(tiny_data, tmp_path):
    """--summarize reads runs and their sweeps from disk: rows in the paper's order, one column per
    task, the chosen learning rate's mean ± 95% CI, the stability figure, and the two figures when
    matplotlib is there."""
    root = tmp_path / "exp"
    runs = {"mlm": dict(objective="mlm", switch_to="none"),
            "clm": dict(objective="clm", switch_to="none"),
            "half": dict(objective="clm", switch_to="mlm", switch_at=0.5),
            "clm-cpt": dict(init_from=root / "clm" / "ckpt.pt", objective="mlm", switch_to="none",
                            max_steps=4)}
    for name, overrides in runs.items():
        train.main(run_args(tiny_data, str(root / name), **overrides))
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    early = experiment.main([f"--summarize={root}", f"--figures={tmp_path / 'early'}"
                             if has_matplotlib else "--figures="])
    assert early["tasks"] == [] and \
        early["tables"].splitlines()[0] == "| run | pretraining | mean |"
    if has_matplotlib:  # before any fine-tuning, the losses are the one figure to draw
        assert [os.path.basename(p) for p in early["figures"]] == ["experiment_losses.png"]
    sc_train, sc_test = sc_files(tmp_path)
    reports = {}
    for name in runs:
        reports[name] = ft.main([f"--init_from={root / name / 'ckpt.pt'}", "--task=sc",
                                 f"--train={sc_train}", f"--test={sc_test}", "--lrs=1e-3,4e-3",
                                 "--seeds=2", "--batch_size=8", "--max_steps=2",
                                 "--progress=False", f"--out_dir={root / name / 'sc'}"])
    figures = tmp_path / "figures"
    summary = experiment.main([f"--summarize={root}"] +
                              ([f"--figures={figures}"] if has_matplotlib else []))

    # CLM share falling, then continued pretraining
    assert summary["runs"] == ["clm", "half", "mlm", "clm-cpt"]
    lines = summary["tables"].splitlines()
    assert lines[0] == "| run | pretraining | sc accuracy | mean |"
    rep = reports["half"]
    assert f"| half | CLM 4 -> MLM 4 | {rep['test_mean']:.2f} ± {rep['test_ci95']:.2f} | " \
           f"{rep['test_mean']:.2f} |" in lines
    assert any(line.startswith("| clm-cpt | clm + MLM 4 |") for line in lines)
    last = read_log(str(root / "mlm"))[1][-1]
    sd = reports["mlm"]["stability_sd"]
    converged = reports["mlm"]["stability_sd_converged"]
    assert (f"| mlm | {sd:.2f} | {sd:.2f} | {converged:.2f} | {last['val_clm']:.4f} | "
            f"{last['val_mlm']:.4f} |") in lines
    assert (root / "summary.md").read_text() == summary["tables"] + "\n"
    if has_matplotlib:
        assert sorted(p.name for p in figures.iterdir()) == \
            ["experiment_losses.png", "experiment_lr.png"]
        assert all(p.read_bytes()[:4] == b"\x89PNG" for p in figures.iterdir())

    # the data-efficiency view: checkpoints kept along a run, fine-tuned, against its steps
    train.main(run_args(tiny_data, str(root / "kept"), objective="clm", switch_to="none",
                        keep_checkpoints="2,4"))
    by_step = {}
    for step, ckpt in ((2, "ckpt_2.pt"), (4, "ckpt_4.pt"), (8, "ckpt.pt")):
        by_step[step] = ft.main([f"--init_from={root / 'kept' / ckpt}", "--task=sc",
                                 f"--train={sc_train}", f"--test={sc_test}", "--lrs=1e-3",
                                 "--seeds=2", "--batch_size=8", "--max_steps=2", "--progress=False",
                                 f"--out_dir={root / 'kept' / f'step{step}_sc'}"])
    summary = experiment.main([f"--summarize={root}"]
                              + ([f"--figures={figures}"] if has_matplotlib else []))
    lines = summary["tables"].splitlines()
    assert "| run | step | tokens | sc |" in lines
    for step, rep in by_step.items():  # 2 x 32 tokens a step
        assert f"| kept | {step} | {step * 64:,} | {rep['test_mean']:.2f} |" in lines
    if has_matplotlib:
        assert (figures / "experiment_steps.png").read_bytes()[:4] == b"\x89PNG"
        assert (figures / "experiment_flops.png").read_bytes()[:4] == b"\x89PNG"
    kept = next(run for run in map(experiment.read_run, [str(root / "kept" / "ckpt.pt")]))
    model = experiment.Transformer(experiment.ModelConfig(**kept["model_config"]))
    assert experiment.training_flops(kept, 4) == pytest.approx(
        4 * 64 * model.flops_per_token(32, causal=True))  # 4 CLM steps of 2 x 32 tokens

    # a sweep filed under the wrong run would put its scores in the wrong row
    shutil.copytree(root / "mlm" / "sc", root / "clm" / "sc_of_mlm")
    with pytest.raises(SystemExit, match="not this run's"):
        experiment.main([f"--summarize={root}"])
    with pytest.raises(SystemExit, match="no run in"):
        experiment.main([f"--summarize={tmp_path / 'empty'}"])

def test_cpu_experiment_runs_every_step_in_order_and_picks_up_where_it_stopped(tmp_path,
                                                                               monkeypatch,
                                                                               capsys):
    """experiment.py's orchestration, with the commands recorded instead of run: the seven
    pretraining runs (each CPT run after its source), then one sweep per run and task with the
    grid settings, then the summary; a second call keeps finished runs, resumes an interrupted
    one and says which; other settings than a run's own are refused, not reused."""
    commands, summaries = [], []

    def out_dir_of(args):
        return next(a.split("=", 1)[1] for a in args if a.startswith("--out_dir="))

    def fake_command(args, log_path):  # a finished run leaves its checkpoint and summary.json
        commands.append(args)
        out_dir = out_dir_of(args)
        os.makedirs(out_dir, exist_ok=True)
        if args[0] == "train.py" and "--init_from=resume" not in args:
            saved = {a[2:].split("=", 1)[0]: a.split("=", 1)[1] for a in args[1:]}
            config = {k: parse_value(type(getattr(train.TrainConfig(), k)), v)
                      for k, v in saved.items()}
            torch.save({"format": CHECKPOINT_FORMAT, "train_config": config},
                       os.path.join(out_dir, "ckpt.pt"))
            steps = config["max_steps"]
            (tmp_path / "exp" / os.path.basename(out_dir) / "summary.json").write_text(
                f'{{"steps": {steps}, "max_steps": {steps}}}')
    monkeypatch.setattr(experiment, "run_command", fake_command)
    monkeypatch.setattr(experiment, "summarize", lambda *a: summaries.append(a))
    argv = [f"--out_dir={tmp_path / 'exp'}", "--jobs=1", "--tasks=sc,qa", "--steps=40",
            "--cpt_steps=20", "--decay_steps=10", "--warmup_steps=4", "--figures=",
            "--keep=10,20", "--keep_tasks=sc"]
    experiment.main(argv)
    pretraining = [a for a in commands if a[0] == "train.py"]
    names = [os.path.basename(out_dir_of(a)) for a in pretraining]
    assert names == list(experiment.RUNS)  # jobs=1: in order, each CPT run after its source
    assert [n for n, a in zip(names, pretraining) if "--keep_checkpoints=10,20" in a] == \
        ["clm", "mlm"]
    cpt = next(a for a in pretraining if "--out_dir=" + str(tmp_path / "exp" / "clm-cpt") in a)
    assert f"--init_from={tmp_path / 'exp' / 'clm' / 'ckpt.pt'}" in cpt and "--max_steps=20" in cpt
    assert "--decay_steps=10" in cpt and "--warmup_steps=1" in cpt  # the schedule passed through
    sweeps = [a for a in commands if a[0] == "finetune.py"]
    assert len(sweeps) == 7 * 2 + 2 * 2 and all("--lrs=1e-3,3e-3,1e-2" in a and "--seeds=2" in a
                                                for a in sweeps)
    assert f"--init_from={tmp_path / 'exp' / 'mlm' / 'ckpt_20.pt'}" in sweeps[-1]
    assert summaries == [(str(tmp_path / "exp"), "")]

    commands.clear()
    (tmp_path / "exp" / "mlm" / "summary.json").unlink()  # mlm was interrupted after a checkpoint
    experiment.main(argv)
    assert [a for a in commands if a[0] == "train.py"] == [
        ["train.py", "--init_from=resume", f"--out_dir={tmp_path / 'exp' / 'mlm'}",
         "--progress=False"]]
    printed = capsys.readouterr().out
    assert "clm: kept (finished, the same settings)" in printed and "mlm: resuming" in printed
    with pytest.raises(SystemExit, match=r"exp/clm was trained with --max_steps=40, not 60"):
        experiment.main([a for a in argv if not a.startswith("--steps")] + ["--steps=60"])

def test_quick_experiment_settings_fit_and_bad_schedules_are_named(monkeypatch, tmp_path):
    cfg = experiment.ExperimentConfig(**experiment.QUICK)
    settings.check(cfg)
    # --quick writes beside a full experiment, not over it; a given --out_dir still wins
    ran = []
    monkeypatch.setattr(experiment, "run_experiment", ran.append)
    monkeypatch.setattr(experiment, "summarize", lambda *a: {})
    experiment.main(["--quick"])  # a bare flag switches a bool setting on
    experiment.main(["--quick=true", f"--out_dir={tmp_path}", "--steps=80"])
    assert [(c.out_dir, c.steps) for c in ran] == [("out/exp-quick", 60), (str(tmp_path), 80)]
    with pytest.raises(SystemExit, match=r"--warmup_steps=20 \+ --decay_steps=40 must fit in "
                                         r"--steps=50"):
        experiment.main(["--steps=50"])
    with pytest.raises(SystemExit, match=r"--decay_steps must be >= 0, got -1"):
        experiment.main(["--decay_steps=-1"])
