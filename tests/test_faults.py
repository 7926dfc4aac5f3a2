"""
Faults and bad input: nothing executed, nothing lost, every error names its cause. Crashes (a
process killed mid-step, a torn log line, a full disk), non-finite numbers, hostile or broken
files, and settings that would silently do the wrong thing.
"""

import glob
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from mlm_vs_clm import checkpoints
from mlm_vs_clm import files
import experiment
import finetune as ft
import train
from tests.helpers import (HERE, error_of, make_checkpoint, make_family, read_log, rows,
                           run_args, sc_files, tiny_body, write_jsonl)
from data import load_meta, prepare

def train_in_subprocess(args, crash_at_step=None, timeout=120):
    """train.py in its own process; crash_at_step=N: the process dies (os._exit, no cleanup, no
    buffers flushed, like kill -9) when step N starts."""
    crash = "" if crash_at_step is None else textwrap.dedent(f"""
        real = train.train_step
        def train_step(*a, **k):
            if a[0].step == {crash_at_step}:
                os._exit(9)
            return real(*a, **k)
        train.train_step = train_step
        """)
    code = f"import os, sys, train\n{crash}\ntrain.main(sys.argv[1:])\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=HERE, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))

def strict_json_lines(path):
    def reject(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")
    with open(path) as f:
        return [json.loads(line, parse_constant=reject) for line in f]

def test_summarize_never_unpickles_code(tmp_path):
    class Payload:  # what a hostile checkpoint carries: unpickling it would create `marker`
        def __reduce__(self):
            return os.mkdir, (str(tmp_path / "marker"),)
    (tmp_path / "exp" / "run").mkdir(parents=True)
    torch.save({"format": checkpoints.CHECKPOINT_FORMAT, "train_config": {}, "x": Payload()},
               tmp_path / "exp/run/ckpt.pt")
    (tmp_path / "exp/run/log.jsonl").write_text("")
    with pytest.raises(SystemExit) as e:
        experiment.main([f"--summarize={tmp_path / 'exp'}", "--figures="])
    message = str(e.value)
    assert "ckpt.pt holds Python objects" in message and "not loaded" in message
    assert not (tmp_path / "marker").exists()

@pytest.mark.slow
def test_a_non_finite_gradient_is_never_applied_nor_saved(tiny_data, tmp_path):
    """lr=1e9: step 2's loss is finite but its gradient is not. That update must not be applied, no
    checkpoint may hold a NaN, and the message names the real last good checkpoint, or says there is
    none."""
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        train.main(run_args(tiny_data, out, lr=1e9, max_steps=20, eval_interval=2))
    assert "gradient norm nan" in str(e.value) and \
        "No checkpoint of this run was written yet" in str(e.value)
    assert not os.path.exists(os.path.join(out, "ckpt.pt"))
    train.main(run_args(tiny_data, out, max_steps=20, eval_interval=2, stop_at=2))
    with pytest.raises(SystemExit) as e:  # the resumed steps' learning rate is 1e9 too
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(train, "lr_at", lambda *args: 1e9)
            train.main(run_args(tiny_data, out, init_from="resume", max_steps=20, eval_interval=2))
    assert f"last good checkpoint is {out}/ckpt.pt (step 2)" in str(e.value)
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 2 and checkpoints.first_non_finite(ckpt) is None
    strict_json_lines(os.path.join(out, "log.jsonl"))

def test_a_non_finite_checkpoint_is_refused_and_the_old_one_kept(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    checkpoints.save_checkpoint({"step": 1, "model": {"w": torch.ones(3)}, "model_config": {}},
                                path)
    with pytest.raises(FloatingPointError, match=r"model\.w holds non-finite values at step 2"):
        inf = torch.tensor([1.0, float("inf"), 0.0])
        checkpoints.save_checkpoint({"step": 2, "model": {"w": inf}, "model_config": {}}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    nan_state = {"optimizer": {"state": {0: {"exp_avg": torch.tensor([float("nan")])}}}}
    assert checkpoints.first_non_finite(nan_state) == "optimizer.state.0.exp_avg"

def test_finetuning_stops_before_a_non_finite_update(tmp_path):
    """A loss that is finite with a NaN gradient (sqrt at 0 in the backward pass) from step 2 on:
    the cell is flagged as diverged at step 2 and scored with the weights of step 2, which are
    finite."""
    family, cfg = make_family("sc", [{"text": f"text {i}", "label": i % 2} for i in range(64)],
                              batch_size=8, max_steps=6)
    real, calls = family.loss, []

    def loss(body, head, batch):
        calls.append(1)
        value = real(body, head, batch)
        w = head.classifier.weight
        return value + ((w - w.detach()).pow(2).sum().sqrt() if len(calls) > 2 else 0)
    family.loss = loss
    body = tiny_body()
    splits = {"train": family.encode(rows([{"text": f"text {i}", "label": i % 2}
                                           for i in range(64)])),
              "test": family.encode(rows([{"text": "text 1", "label": 1}]))}
    result = ft.train_cell(family, body, splits, cfg, 1e-3, seed=0)[0]
    assert result["diverged_at"] == 2 and math.isfinite(result["test"]["accuracy"])
    assert all(torch.isfinite(p).all() and p.grad is None for p in body.parameters())

@pytest.mark.slow
def test_resume_rewrites_the_log_atomically_and_drops_a_torn_line(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    train.main(run_args(tiny_data, out, stop_at=4))
    log = os.path.join(out, "log.jsonl")
    kept = open(log).read()
    # The process dies as the first resumed step starts: on main, the log was truncated and its
    # lines buffered.
    died = train_in_subprocess(run_args(tiny_data, out, init_from="resume"), crash_at_step=4)
    assert died.returncode == 9 and open(log).read() == kept
    with open(log, "a") as f:
        f.write('{"step": 5, "objective": "ml')  # a crash in the middle of a write
    train.main(run_args(tiny_data, out, init_from="resume"))
    steps, evals = read_log(out)
    assert [r["step"] for r in steps] == list(range(1, 9)) and \
        [e["step"] for e in evals] == [0, 4, 8]

@pytest.mark.slow
def test_a_restart_after_a_crash_before_the_first_checkpoint_logs_step_0_once(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    assert train_in_subprocess(run_args(tiny_data, out), crash_at_step=1).returncode == 9
    train.main(run_args(tiny_data, out))
    assert [e["step"] for e in read_log(out)[1]] == [0, 4, 8]

def test_log_is_strict_json_when_a_figure_is_not_finite(tiny_data, tmp_path, monkeypatch):
    # an unknown GPU: MFU NaN
    monkeypatch.setattr(train.parallel, "peak_flops", lambda device: float("nan"))
    out = str(tmp_path / "run")
    train.main(run_args(tiny_data, out, max_steps=2, switch_at=1, warmup_steps=1, decay_steps=1))
    records = strict_json_lines(os.path.join(out, "log.jsonl"))
    assert [r["mfu"] for r in records if "mfu" in r] == [None, None]

@pytest.mark.slow
def test_one_run_per_out_dir_and_a_crashed_run_leaves_no_stuck_lock(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    with files.exclusive(out, "a test"):
        with pytest.raises(SystemExit, match="another process is already working there"):
            train.main(run_args(tiny_data, out))
    assert not os.path.exists(os.path.join(out, "log.jsonl"))  # the refused run touched nothing
    assert train_in_subprocess(run_args(tiny_data, out), crash_at_step=1).returncode == 9
    train.main(run_args(tiny_data, out))  # the lock died with its process
    assert not any(name.endswith(".lock") for name in os.listdir(out))  # and left no file
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    train_file, test_file = sc_files(tmp_path)
    with files.exclusive(str(tmp_path / "ft"), "a test"):
        assert "already working there" in error_of([f"--init_from={ckpt}", "--task=sc",
                                                    f"--train={train_file}", f"--test={test_file}",
                                                    f"--out_dir={tmp_path / 'ft'}"])

@pytest.mark.slow
def test_two_preparations_of_one_directory_run_one_after_the_other(tmp_path, capsys):
    """Another process is preparing the directory (held at its tokenizer until told to go on); a
    prepare(reuse=True) started meanwhile waits for it, then reuses its files instead of writing the
    same files at the same time."""
    import threading
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n"
                                              for i in range(50)))
    out, source = str(tmp_path / "data"), str(tmp_path / "c.jsonl")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, data
        real = data._write_token_files
        def held(*args):
            print("held", flush=True)
            sys.stdin.readline()
            return real(*args)
        data._write_token_files = held
        data.prepare({source!r}, {out!r}, "cl100k_8k", val_fraction=0.2)
        """)], cwd=HERE, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().startswith("preparing ") and \
        holder.stdout.readline() == "held\n"
    result = {}
    waiting = threading.Thread(target=lambda: result.update(
        meta=prepare(source, out, val_fraction=0.2, reuse=True)))
    waiting.start()
    for _ in range(600):
        if "waiting for another process" in capsys.readouterr().err:
            break
        waiting.join(0.1)
    else:
        pytest.fail("prepare did not wait for the process preparing the directory")
    holder.stdin.write("go\n")
    holder.stdin.flush()
    waiting.join(60)
    assert holder.wait(timeout=60) == 0
    assert result["meta"] == load_meta(out) and sum(result["meta"]["n_documents"].values()) == 50
    assert "preparing" not in capsys.readouterr().out  # reused, not prepared a second time
    assert not any(name.endswith(".tmp") for name in os.listdir(out))

@pytest.mark.parametrize("argv, message", [
    (["--grad_clip=-1"], "grad_clip must be >= 0"),
    (["--lr=inf"], "lr must be a finite number"),
    (["--switch_at=0.001", "--max_steps=40", "--decay_steps=4"],
     "switch_at=0.001 puts the switch at step 0 of 40"),
    (["--switch_at=0.99", "--max_steps=40", "--decay_steps=4"],
     "switch_at=0.99 puts the switch at step 40 of 40"),
    (["--eval_batches=0"], "eval_batches"),
])
def test_settings_that_would_silently_do_the_wrong_thing(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        train.main(argv + [f"--out_dir={tmp_path}"])
    if "grad_clip" in message:
        assert "grad_clip must be >= 0" in error_of(["--init_from=x.pt", "--grad_clip=-1"])

def test_meta_json_is_checked_against_the_tokenizer(tiny_data, tmp_path):
    edited = tmp_path / "data"
    shutil.copytree(tiny_data, edited)
    meta = json.loads((edited / "meta.json").read_text())
    (edited / "meta.json").write_text(json.dumps({**meta, "n_vocab": 9000}))
    with pytest.raises(SystemExit, match=r"meta.json does not match the tokenizer of "
                                         r"--tokenizer=cl100k_8k \(n_vocab 9000 against 8195\)"):
        train.main(run_args(str(edited), str(tmp_path / "run")))
    (edited / "meta.json").write_text('{"tokenizer": "cl100k_8k", ')
    with pytest.raises(SystemExit, match="meta.json is not valid JSON"):
        train.main(run_args(str(edited), str(tmp_path / "run")))
    (edited / "meta.json").write_text(json.dumps({**meta, "mask_id": "8193"}))
    with pytest.raises(SystemExit, match="meta.json: field 'mask_id' must be a token id"):
        train.main(run_args(str(edited), str(tmp_path / "run")))

def test_config_file_errors_name_the_file_and_line(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("lr = 1e-3\nmax_steps = = 5\n")
    with pytest.raises(SystemExit, match=r"broken.py, line 2: invalid syntax"):
        train.main([str(broken)])
    failing = tmp_path / "failing.py"
    failing.write_text("lr = 1e-3\n\nmax_steps = steps * 2\n")
    with pytest.raises(SystemExit,
                       match=r"failing.py, line 3: NameError: name 'steps' is not defined"):
        train.main([str(failing)])

def test_text_that_is_not_utf8_is_named_with_its_line(tmp_path):
    (tmp_path / "a.txt").write_bytes("first line\ncaf\xe9 in latin-1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"a.txt, line 2: not UTF-8 text \(byte 0xe9\)"):
        prepare(str(tmp_path / "a.txt"), str(tmp_path / "out"))
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"b.jsonl, line 2: not UTF-8 text \(byte 0xe9"):
        prepare(str(tmp_path / "b.jsonl"), str(tmp_path / "out"))
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    (tmp_path / "train.jsonl").write_bytes(b'{"text": "fine", "label": 1}\n'
                                           b'{"text": "caf\xe9", "label": 0}\n')
    assert "train.jsonl, line 2: not UTF-8 text" in error_of([f"--init_from={ckpt}", "--task=sc",
                                                              f"--train={tmp_path}/train.jsonl",
                                                              f"--test={tmp_path}/train.jsonl"])

def one_line_error(command, args, cwd):
    result = subprocess.run([sys.executable, os.path.join(HERE, command), *args],
                            capture_output=True, text=True, cwd=cwd, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]

@pytest.mark.slow
def test_bad_files_stop_with_one_line_that_names_them(tiny_data, tmp_path):
    assert "--max_tokens must be of type int, got 'abc'" in \
        one_line_error("data.py", ["--max_tokens=abc"], tmp_path)
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    good = tmp_path / "good" / "ckpt.pt"
    train.main(run_args(tiny_data, str(good.parent), max_steps=2, switch_at=1, warmup_steps=1,
                        decay_steps=1))
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:5000])
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    for name, message in [("notes.txt", "is not a complete PyTorch checkpoint"),
                          ("truncated.pt", "is not a complete PyTorch checkpoint"),
                          ("foreign.pt", "is not a checkpoint of this project")]:
        line = one_line_error("train.py", run_args(tiny_data, str(tmp_path / name[:-3]),
                                                   init_from=tmp_path / name), tmp_path)
        assert f"{tmp_path / name} {message}" in line
    line = one_line_error("train.py", run_args(tiny_data, str(tmp_path / "never"),
                                               init_from="resume"), tmp_path)
    assert f"no {tmp_path / 'never' / 'ckpt.pt'} (the run wrote none yet)" in line

@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tiny_data, tmp_path):
    """/dev/full answers every write with ENOSPC, as a full disk does: the checkpoint write fails,
    the message says so with the path, no temporary file is left behind, and the previous checkpoint
    still loads."""
    out = tmp_path / "run"
    train.main(run_args(tiny_data, str(out), stop_at=4))
    os.symlink("/dev/full", out / "ckpt.pt.tmp")  # where the next checkpoint is written first
    with pytest.raises(SystemExit, match=f"could not write {out / 'ckpt.pt'}"
                                         ".*the previous version of the file"):
        train.main(run_args(tiny_data, str(out), init_from="resume"))
    assert not os.path.lexists(out / "ckpt.pt.tmp")
    assert checkpoints.read_checkpoint(str(out / "ckpt.pt"))["step"] == 4

# --------------------------------------------------------------------------------------------------
# Round two: nothing poisons a run, deletes a file or outlives its parent, and resume cannot
# change the run

def script_error(main, argv, cwd):
    """main(argv) must stop with one `error:` line and leave nothing behind in cwd."""
    before = set(os.listdir(cwd))
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message, message
    assert set(os.listdir(cwd)) == before
    return message

BAD_SETTINGS = {
    "train": ["--attention=flash", "--seed=-1", "--out_dir=", "--max_steps=0", "--batch_size=-2",
              "--block_size=1", "--weight_decay=-1", "--adam_eps=0", "--beta2=1",
              "--log_interval=0", "--total_batch_size=-1", "--max_steps=inf",
              "--max_steps=1e30", "--device=tpu", "--tokenizer=cl100k_999k",
              "--init_from=missing.pt", "--init_from=hf:missing"],
    "finetune": ["--lrs=1e-3,inf", "--seeds=0", "--max_len=4", "--weights=auto", "--device=tpu",
                 "--init_from=missing.pt", "--temperature=0", "--batch_size=0"],
    "sample": ["--top_k=0", "--seed=-1", "--init_from=missing.pt", "--device=tpu",
               "--temperature=-1"],
    "data": ["--max_tokens=-1", "--val_fraction=2", "--tokenizer=bpe"],
    "experiment": ["--jobs=0", "--steps=50", "--seeds=0"],
    "bench": ["--steps=1", "--compare=speed", "--gpu_gb=0", "--device=tpu"],
    "export": ["--kind=other", "--init_from=", "--init_from=missing.pt"],
}
if not torch.cuda.is_available():  # a device this torch build or machine lacks
    for script in ("train", "finetune", "sample", "bench"):
        BAD_SETTINGS[script].append("--device=cuda")

@pytest.mark.parametrize("script, bad", [(s, b) for s, bads in BAD_SETTINGS.items()
                                         for b in bads])
def test_every_script_names_a_bad_setting_before_any_work(script, bad, tmp_path, monkeypatch):
    import importlib
    module = importlib.import_module("mlm_vs_clm.export" if script == "export" else script)
    monkeypatch.chdir(tmp_path)
    ckpt = make_checkpoint(tmp_path / "ckpt.pt") if script in ("finetune", "sample") else None
    argv = [f"--init_from={ckpt}"] if ckpt and "--init_from" not in bad else []
    if script in ("train", "finetune") and "--out_dir" not in bad:
        argv.append(f"--out_dir={tmp_path / 'out'}")
    message = script_error(module.main, argv + [bad], tmp_path)
    assert bad.split("=")[0] in message

def test_a_checkpoint_never_holds_a_config_that_cannot_load(tmp_path):
    model = make_checkpoint(tmp_path / "ckpt.pt")
    payload = torch.load(model, weights_only=True)
    payload["model_config"]["attention"] = "flash"
    with pytest.raises(ValueError, match="attention='flash'"):
        checkpoints.save_checkpoint(payload, str(tmp_path / "bad.pt"))
    assert not os.path.exists(tmp_path / "bad.pt")

def test_export_writes_only_where_it_may_and_a_failure_keeps_the_old_export(tmp_path, monkeypatch):
    from mlm_vs_clm import export
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    payload = torch.load(ckpt, weights_only=True) | {"objective": "mlm"}
    torch.save(payload, ckpt)
    theirs = tmp_path / "theirs"
    (theirs / "2_Normalize").mkdir(parents=True)
    (theirs / "2_Normalize" / "weights.bin").write_text("mine")
    (theirs / "config.json").write_text("{}")
    message = script_error(export.main, [f"--init_from={ckpt}", f"--out_dir={theirs}"], tmp_path)
    assert "did not write" in message and str(theirs) in message
    assert (theirs / "2_Normalize" / "weights.bin").read_text() == "mine"
    ours = tmp_path / "ours"
    export.main([f"--init_from={ckpt}", f"--out_dir={ours}"])
    before = {p.name: p.read_bytes() for p in ours.iterdir() if p.is_file()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(export, "save_file", full_disk)
    message = script_error(export.main, [f"--init_from={ckpt}", f"--out_dir={ours}",
                                         "--kind=decoder"], tmp_path)
    assert "could not write" in message
    assert {p.name: p.read_bytes() for p in ours.iterdir() if p.is_file()} == before
    monkeypatch.undo()
    export.main([f"--init_from={ckpt}", f"--out_dir={ours}", "--kind=decoder"])  # ours: replaced
    assert json.loads((ours / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    if os.geteuid() != 0:  # root writes anywhere
        readonly = tmp_path / "ro"
        readonly.mkdir(mode=0o500)
        assert "Permission denied" in script_error(
            export.main, [f"--init_from={ckpt}", f"--out_dir={readonly / 'hf'}"], tmp_path)

@pytest.mark.slow
def test_a_moved_experiment_is_still_summarised(tiny_data, tmp_path):
    root = tmp_path / "exp"
    train.main(run_args(tiny_data, str(root / "clm"), objective="clm", switch_to="none",
                        keep_checkpoints="4"))
    train.main(run_args(tiny_data, str(root / "cpt"), init_from=root / "clm" / "ckpt.pt",
                        objective="mlm", switch_to="none", max_steps=4))
    sc_train, sc_test = sc_files(tmp_path)
    for ckpt, out in (("ckpt.pt", "sc"), ("ckpt_4.pt", "step4_sc")):
        ft.main([f"--init_from={root / 'clm' / ckpt}", "--task=sc", f"--train={sc_train}",
                 f"--test={sc_test}", "--lrs=1e-3", "--seeds=1", "--batch_size=8",
                 "--max_steps=1", "--progress=False", f"--out_dir={root / 'clm' / out}"])
    shutil.move(root, tmp_path / "moved")
    summary = experiment.main([f"--summarize={tmp_path / 'moved'}", "--figures="])
    assert summary["runs"] == ["clm", "cpt"] and summary["tasks"] == ["sc"]
    assert any(line.startswith("| cpt | clm + MLM 4 |") for line in summary["tables"].splitlines())
    assert "| clm | 4 |" in summary["tables"]

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's parent-death signal")
@pytest.mark.parametrize("how", ["pool", "child"])
def test_workers_and_children_die_with_their_parent(tmp_path, how):
    """A parent killed with -9 while its docstring-parsing workers (or experiment.py's train.py
    runs) still work: none of them outlives it, not even a worker forked just before the kill."""
    code = textwrap.dedent(f"""
        import os, sys, time, subprocess
        from concurrent.futures import ProcessPoolExecutor
        from mlm_vs_clm.settings import die_with_parent
        if {how!r} == "pool":
            pool = ProcessPoolExecutor(2, initializer=die_with_parent, initargs=(os.getpid(),))
            pids = [pool.submit(os.getpid).result() for _ in range(4)]
            [pool.submit(time.sleep, 600) for _ in range(2)]
        else:
            child = subprocess.Popen([sys.executable, "-c", "import time; from mlm_vs_clm."
                                      "settings import command; command(time.sleep)(600)"],
                                     env=dict(os.environ, MLM_VS_CLM_PARENT=str(os.getpid())))
            pids = [child.pid]
        print(*set(pids), flush=True)
        time.sleep(600)
        """)
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=HERE, stdout=subprocess.PIPE,
                              text=True)
    children = {int(p) for p in parent.stdout.readline().split()}
    # every process it started by now, whether its initializer has run or not
    children |= {int(p) for path in glob.glob(f"/proc/{parent.pid}/task/*/children")
                 for p in open(path).read().split()}
    parent.kill()
    parent.wait()
    for _ in range(100):
        alive = [p for p in children if os.path.exists(f"/proc/{p}")
                 and open(f"/proc/{p}/stat").read().split()[2] != "Z"]
        if not alive:
            break
        import time
        time.sleep(0.1)
    assert alive == []

def peak_memory_of(code: str) -> tuple[str, float]:
    """(stderr's last line, peak resident GB) of a python process running code."""
    result = subprocess.run([sys.executable, "-c", code + textwrap.dedent("""
        import resource, sys
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, file=sys.stderr)
        """)], cwd=HERE, capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    return lines[-2] if len(lines) > 1 else "", float(lines[-1])

def test_hostile_sizes_are_refused_before_anything_is_built(tmp_path):
    from mlm_vs_clm import export
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    payload = torch.load(ckpt, weights_only=True)
    for field, value in (("n_layer", 100_000), ("n_embd", 65_536)):
        torch.save({**payload, "model_config": {**payload["model_config"], field: value}},
                   tmp_path / f"{field}.pt")
        error, gb = peak_memory_of(textwrap.dedent(f"""
            from mlm_vs_clm.checkpoints import load_model
            try:
                load_model({str(tmp_path / f"{field}.pt")!r})
            except ValueError as e:
                import sys; print(e, file=sys.stderr)
            """))
        assert "do not fit its model config" in error and gb < 1.5
    torch.save(payload | {"objective": "clm"}, ckpt)
    hf_dir = tmp_path / "hf"
    export.export(ckpt, str(hf_dir))
    config = json.loads((hf_dir / "config.json").read_text())
    for changes, message in (({"num_hidden_layers": 1_000_000}, "1000000 blocks"),
                             ({"hidden_size": 65_536, "head_dim": 16_384}, "shape"),
                             ({"num_attention_heads": 0}, "positive integer"),
                             ({"num_hidden_layers": 1}, "1 blocks and its weights 2"),
                             ({"num_hidden_layers": 2.0}, "positive integer")):
        (hf_dir / "config.json").write_text(json.dumps({**config, **changes}))
        error, gb = peak_memory_of(textwrap.dedent(f"""
            from mlm_vs_clm.checkpoints import load_model
            try:
                load_model("hf:{hf_dir}")
            except ValueError as e:
                import sys; print(e, file=sys.stderr)
            """))
        assert message in error and gb < 1.5, (changes, error)
    (hf_dir / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json: a JSON list"):
        checkpoints.load_model(f"hf:{hf_dir}")
    (hf_dir / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        checkpoints.load_model(f"hf:{hf_dir}")

def test_bad_weights_are_refused_naming_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    from mlm_vs_clm import export
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    torch.save(torch.load(ckpt, weights_only=True) | {"objective": "clm"}, ckpt)
    hf_dir = tmp_path / "hf"
    export.export(ckpt, str(hf_dir))
    weights = load_file(hf_dir / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    for bad, message in ((weights[name].to(torch.int8), "I8 values, not floating point"),
                         (weights[name].clone().fill_(float("nan")), "NaN or infinite")):
        save_file({**weights, name: bad}, hf_dir / "model.safetensors")
        with pytest.raises(ValueError, match=f"{name}.*{message}"):
            checkpoints.load_model(f"hf:{hf_dir}")
    payload = torch.load(ckpt, weights_only=True)
    payload["model"]["blocks.0.attn.q_proj.weight"][0, 0] = float("nan")
    torch.save(payload, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q_proj\.weight holds NaN"):
        checkpoints.load_model(str(tmp_path / "nan.pt"))

@pytest.mark.slow
def test_resume_refuses_what_would_change_the_run_and_extends_what_it_can(tiny_data, tmp_path,
                                                                          capsys):
    out = str(tmp_path / "run")
    train.main(run_args(tiny_data, out, stop_at=4, max_steps=8, switch_at=0.5))
    resume = dict(init_from="resume", max_steps=8, switch_at=0.5)
    for change, setting in ((dict(max_steps=16), "switch"), (dict(objective="mlm"), "objective"),
                            (dict(switch_to="clm", objective="mlm"), "objective"),
                            (dict(batch_size=4), "sequences a step"),
                            (dict(model="tiny"), "--model"), (dict(lr=1e-2), "--lr")):
        assert setting in script_error(train.main, run_args(tiny_data, out, **resume | change),
                                       tmp_path)
    # a resumed run validates against its own settings, and may extend an absolute switch
    train.main(run_args(tiny_data, out, init_from="resume", switch_at=4, max_steps=16))
    assert "extending the run from 8 to 16 steps; the switch stays at step 4" in \
        capsys.readouterr().out
    steps, evals = read_log(out)
    assert [r["step"] for r in steps] == list(range(1, 17)) and \
        [r["objective"] for r in steps] == ["clm"] * 4 + ["mlm"] * 12
    assert [r["tokens"] for r in steps] == sorted(r["tokens"] for r in steps)
    log, summary = open(os.path.join(out, "log.jsonl")).read(), \
        open(os.path.join(out, "summary.json")).read()
    train.main(run_args(tiny_data, out, init_from="resume", switch_at=4, max_steps=16))
    assert "nothing to train" in capsys.readouterr().out
    assert open(os.path.join(out, "log.jsonl")).read() == log
    assert open(os.path.join(out, "summary.json")).read() == summary
    shutil.copy(os.path.join(out, "ckpt.pt"), tmp_path / "full.pt")
    train.main(run_args(tiny_data, str(tmp_path / "kept"), keep_checkpoints="2", max_steps=4,
                        stop_at=3, warmup_steps=1, decay_steps=1))
    shutil.copy(tmp_path / "kept" / "ckpt_2.pt", tmp_path / "kept" / "ckpt.pt")
    assert "holds weights only" in script_error(
        train.main, run_args(tiny_data, str(tmp_path / "kept"), init_from="resume",
                             max_steps=4, warmup_steps=1, decay_steps=1), tmp_path)
    foreign = torch.load(tmp_path / "full.pt", weights_only=True)
    foreign["train_config"]["flash_attention"] = True
    torch.save(foreign, os.path.join(out, "ckpt.pt"))
    assert "settings this code does not know (['flash_attention'])" in script_error(
        train.main, run_args(tiny_data, out, init_from="resume", switch_at=4, max_steps=16),
        tmp_path)

def test_prepared_data_on_read_only_storage_is_read(tiny_data, tmp_path, monkeypatch):
    def no_lock(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))
    monkeypatch.setattr(files, "exclusive", no_lock)  # as on a read-only file system
    assert prepare("anything", tiny_data, reuse=True) == load_meta(tiny_data)

def test_finetuning_refuses_a_retrieval_split_with_no_relevant_document(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    train_file = write_jsonl(tmp_path / "train.jsonl", [{"query": f"q{i}", "document": f"d{i}"}
                                                          for i in range(8)])
    test_file = write_jsonl(tmp_path / "test.jsonl", [{"query": "q", "document": "d",
                                                        "grade": 0}])
    message = error_of([f"--init_from={ckpt}", "--task=ir", f"--train={train_file}",
                        f"--test={test_file}", f"--out_dir={tmp_path / 'out'}"])
    assert "test.jsonl: the test split judges no document relevant" in message
    assert not os.path.exists(tmp_path / "out" / "results.jsonl")

def test_finetuning_reruns_when_hf_weights_change_in_place(tmp_path, monkeypatch):
    from mlm_vs_clm import export
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    torch.save(torch.load(ckpt, weights_only=True) | {"objective": "mlm"}, ckpt)
    export.export(ckpt, str(tmp_path / "hf"))
    train_file, test_file = sc_files(tmp_path)
    argv = [f"--init_from=hf:{tmp_path / 'hf'}", "--task=sc", f"--train={train_file}",
            f"--test={test_file}", "--lrs=1e-3", "--seeds=1", "--batch_size=8", "--max_steps=1",
            "--progress=False", f"--out_dir={tmp_path / 'ft'}"]
    calls, real = [], ft.train_cell
    monkeypatch.setattr(ft, "train_cell", lambda *a: calls.append(1) or real(*a))
    ft.main(argv)
    weights = tmp_path / "hf" / "model.safetensors"
    stat, data = os.stat(weights), bytearray(weights.read_bytes())
    data[-4:] = b"\x00\x00\x00\x40"  # one weight (a norm gain, 1.0) becomes 2.0: same size
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    ft.main(argv)
    assert len(calls) == 2

def test_sampling_cannot_overflow(tmp_path):
    import sample
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    out = sample.main([f"--init_from={ckpt}", "--show=continue", "--temperature=1e-30",
                       "--max_new_tokens=3"])
    assert [len(new) for new in out["continue"].values()] == [3]

def test_ctrl_c_says_what_was_saved(tiny_data, tmp_path, monkeypatch, capsys):
    real = train.train_step

    def interrupted(run, *args):
        if run.step == 5:
            raise KeyboardInterrupt
        return real(run, *args)
    monkeypatch.setattr(train, "train_step", interrupted)
    with pytest.raises(SystemExit) as e:
        train.main(run_args(tiny_data, str(tmp_path / "run")))
    assert e.value.code == 130
    assert f"interrupted: training stopped at step 5. The last good checkpoint is " \
           f"{tmp_path / 'run' / 'ckpt.pt'} (step 4)" in capsys.readouterr().err
