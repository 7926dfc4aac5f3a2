"""
Pretraining (train.py): the schedule, the objective switch, resume, gradient accumulation, DDP,
the device choice, settings and config files, continued pretraining.
"""

import os
import subprocess
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import objectives as O
from mlm_vs_clm import settings
import train
from tests.helpers import HERE, VOCAB, random_tokens, read_log, run_args, tiny_model
from mlm_vs_clm.parallel import Process, device_and_autocast
from model import lr_at

def test_lr_schedule_is_warmup_stable_decay():
    cfg = train.TrainConfig(max_steps=100, warmup_steps=10, decay_steps=20, lr=1.0)
    lrs = [lr_at(s, cfg.lr, cfg.max_steps, cfg.warmup_steps, cfg.decay_steps) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0  # linear from 0
    assert all(lr == 1.0 for lr in lrs[10:80])  # stable
    # linear decay, reaching 0 after the last step
    assert lrs[80] == 1.0 and lrs[99] == pytest.approx(1 / 20)
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:]))

def test_switch_step():
    assert O.switch_step("mlm", 0.25, 40) == 10  # a fraction of the budget
    assert O.switch_step("mlm", 30.0, 40) == 30  # a step
    assert O.switch_step("none", 0.25, 40) is None

def test_run_switches_objective_keeps_optimizer_and_does_not_rewarm(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    train.main(run_args(tiny_data, out))
    steps, evals = read_log(out)
    assert [r["objective"] for r in steps] == ["clm"] * 4 + ["mlm"] * 4
    cfg = train.TrainConfig(max_steps=8, warmup_steps=2, decay_steps=2, lr=3e-3)
    assert [r["lr"] for r in steps] == pytest.approx(
        [lr_at(s, cfg.lr, 8, cfg.warmup_steps, cfg.decay_steps) for s in range(8)])
    assert steps[4]["lr"] == 3e-3  # the first MLM step runs at the peak: no new warmup
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    # one optimizer for the whole run: AdamW's step count spans both phases
    assert all(state["step"].item() == 8 for state in ckpt["optimizer"]["state"].values())
    assert [e["step"] for e in evals] == [0, 4, 8]
    assert evals[-1]["val_clm"] < evals[0]["val_clm"] and evals[-1]["val_mlm"] < evals[0]["val_mlm"]

@pytest.mark.slow
def test_resume_is_exact(tiny_data, tmp_path):
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    train.main(run_args(tiny_data, whole))
    train.main(run_args(tiny_data, split, stop_at=3))  # stops mid-CLM, with a checkpoint
    assert torch.load(os.path.join(split, "ckpt.pt"), weights_only=True)["step"] == 3
    train.main(run_args(tiny_data, split, init_from="resume"))
    (steps_a, evals_a), (steps_b, evals_b) = read_log(whole), read_log(split)
    timing = ("tokens_per_s", "mfu")
    assert [{k: v for k, v in r.items() if k not in timing} for r in steps_a] == \
           [{k: v for k, v in r.items() if k not in timing} for r in steps_b]
    # the stop added an evaluation at step 3
    assert evals_a == [e for e in evals_b if e["step"] != 3]
    a = torch.load(os.path.join(whole, "ckpt.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(split, "ckpt.pt"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

def test_gradient_accumulation_averages_over_predicted_tokens():
    """Two MLM micro-batches predict different numbers of tokens; the step must follow the
    gradient of the mean over all of them, as one big batch would, not the mean of the two
    micro-batch means."""
    cfg = train.TrainConfig(objective="mlm", switch_to="none", max_steps=10, warmup_steps=0,
                            decay_steps=0, lr=1.0)
    batches = [random_tokens((2, 32), seed=1), random_tokens((2, 32), seed=2)]
    model, reference = tiny_model(), tiny_model()
    # plain SGD: the update is the (clipped) gradient itself
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, fused=True)
    gen = torch.Generator()
    it = iter(batches)
    run = SimpleNamespace(cfg=cfg, proc=Process(torch.device("cpu"), nullcontext), step=5,
                          loss=O.PretrainingLoss(model, VOCAB, cfg.mask_ratio, "mask", True),
                          raw_model=model, optimizer=opt, grad_accum=2,
                          loader=SimpleNamespace(next_batch=lambda: next(it)))
    train.train_step(run, "mlm", cfg.lr, gen)
    # the same step by hand
    total, count = 0.0, 0
    for micro, tokens in enumerate(batches):
        inputs, labels = O.mask_tokens(tokens, VOCAB, cfg.mask_ratio,
                                       generator=train.reseed(gen, 0, 5, micro))
        logits = reference.logits(reference(inputs, causal=False))
        total = total + F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        count += (labels != O.IGNORE).sum().item()
    (total / count).backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    with torch.no_grad():
        for p, q in zip(model.parameters(), reference.parameters()):
            assert torch.allclose(p, q - q.grad, atol=1e-6)

@pytest.mark.slow
def test_ddp_two_processes_match_one(tiny_data, tmp_path):
    """torchrun with 2 CPU processes (gloo), 1 micro-batch each == 1 process with 2 micro-batches:
    same data, same masks, same losses, through the objective switch."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train.main(run_args(tiny_data, one, total_batch_size=4))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", os.path.join(HERE, "train.py"),
                             *run_args(tiny_data, two, total_batch_size=4)],
                            capture_output=True, text=True, env=env, cwd=HERE, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (steps1, evals1), (steps2, evals2) = read_log(one), read_log(two)
    assert [r["objective"] for r in steps2] == [r["objective"] for r in steps1]
    assert [r["loss"] for r in steps2] == pytest.approx([r["loss"] for r in steps1], rel=1e-4)
    assert [e["val_mlm"] for e in evals2] == pytest.approx([e["val_mlm"] for e in evals1],
                                                           rel=1e-4)

def test_device_choice_on_a_gpu_machine(monkeypatch):
    """What train/finetune/bench do on CUDA, checked on a CPU by standing in for torch.cuda: the
    device always has an index (torch.cuda.set_device refuses "cuda" alone), each torchrun process
    takes its local rank's GPU, and autocast is bfloat16 unless float32 is asked for."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda d: chosen.append(torch.cuda._utils._get_device_index(d)))
    device, autocast = device_and_autocast("auto", "auto")
    assert device == torch.device("cuda", 0) and chosen == [0]
    # bfloat16 (torch.autocast itself needs a CUDA build to be entered)
    assert autocast is not nullcontext
    assert device_and_autocast("cuda", "auto", local_rank=3, world_size=4)[0] == \
        torch.device("cuda", 3)
    assert device_and_autocast("cuda:1", "float32")[1] is nullcontext
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert device_and_autocast("auto", "auto") == (torch.device("cpu"), nullcontext)

@pytest.mark.parametrize("argv, message", [
    (["--max_step=5"], "unknown setting 'max_step'.*max_steps"),
    (["--max_steps=five"], "max_steps must be of type int"),
    (["--lr=fast"], "lr must be of type float"),
    (["--compile=maybe"], "--compile='maybe'"),
    (["--objective=mlm", "--switch_to=mlm"], "switch_to equals --objective"),
    (["--switch_at=1.5", "--max_steps=1"], "switch_at"),
    (["--warmup_steps=300", "--decay_steps=300"], "warmup_steps"),
    (["--objective=bert"], "--objective='bert'"),
    (["--max_steps"], "--max_steps=VALUE"),
    (["nonexistent.py"], "not found"),
    (["train"], "unexpected argument"),
])
def test_bad_settings_fail_before_any_work(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        train.main(argv + [f"--out_dir={tmp_path}"])

def test_config_files_and_help(tmp_path, capsys):
    preset = tmp_path / "preset.py"
    preset.write_text("model = '210m'\nblock_size = 2048\nlr = 5e-4\nmax_steps = 42_000\n")
    cfg = settings.configure(train.TrainConfig, [str(preset), "--lr=1e-4", "--max_steps=1e3"])
    assert (cfg.model, cfg.block_size, cfg.lr, cfg.max_steps) == ("210m", 2048, 1e-4, 1000)
    assert settings.configure(train.TrainConfig, ["--repeat_data"]).repeat_data is True  # a flag
    bad = tmp_path / "bad.py"
    bad.write_text("mask_ratio = '40%'\n")
    with pytest.raises(SystemExit, match="mask_ratio must be of type float.*bad.py"):
        settings.configure(train.TrainConfig, [str(bad)])
    with pytest.raises(SystemExit):
        settings.configure(train.TrainConfig, ["--help"])
    out = capsys.readouterr().out
    assert "--switch_at=0.25" in out and "fraction of max_steps" in out

def test_existing_run_is_not_overwritten_and_bad_data_is_clear(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    train.main(run_args(tiny_data, out, max_steps=4, switch_at=2))
    with pytest.raises(SystemExit, match="init_from=resume"):
        train.main(run_args(tiny_data, out, max_steps=4, switch_at=2))
    with pytest.raises(SystemExit, match="prepared with cl100k_8k"):
        train.main(run_args(tiny_data, str(tmp_path / "other"), tokenizer="cl100k_16k"))

@pytest.mark.slow
def test_continued_pretraining_starts_from_weights(tiny_data, tmp_path):
    base, cpt = str(tmp_path / "clm"), str(tmp_path / "cpt")
    train.main(run_args(tiny_data, base, objective="clm", switch_to="none", max_steps=4))
    train.main(run_args(tiny_data, cpt, init_from=os.path.join(base, "ckpt.pt"), objective="mlm",
                        switch_to="none", max_steps=4))
    (_, base_evals), (cpt_steps, cpt_evals) = read_log(base), read_log(cpt)
    assert cpt_evals[0] == dict(base_evals[-1], step=0)  # starts exactly where the CLM run ended
    assert [r["objective"] for r in cpt_steps] == ["mlm"] * 4
    assert cpt_steps[0]["tokens"] == 2 * 32  # a new run: fresh schedule and step count
    # ... on the blocks after the source's: CPT reads on in the same data stream
    cpt_ckpt = torch.load(os.path.join(cpt, "ckpt.pt"), weights_only=False)
    assert cpt_ckpt["loader"]["position"] == 8 * 2
    # another data order is another stream: it starts at its beginning
    other = str(tmp_path / "other_seed")
    train.main(run_args(tiny_data, other, init_from=os.path.join(base, "ckpt.pt"), objective="mlm",
                        switch_to="none", max_steps=4, seed=1))
    assert torch.load(os.path.join(other, "ckpt.pt"), weights_only=False)["loader"]["position"] == \
        4 * 2

# --------------------------------------------------------------------------------------------------
# The paper's recipe at scale: unique data, intermediate checkpoints, continued pretraining

def train_blocks(data_dir, block_size=32):
    from data import load_meta
    return load_meta(data_dir)["n_tokens"]["train"] // block_size

@pytest.mark.slow
def test_a_run_that_would_read_a_block_twice_stops_unless_told(tiny_data, tmp_path):
    n = train_blocks(tiny_data)
    steps = n // 2 + 1  # two blocks a step: one block more than the data holds
    with pytest.raises(SystemExit, match=rf"block 0 of {n:,} it fits {n // 2:,} steps of 2 "
                                         rf"sequences, not the {steps:,} asked.*twice.*"
                                         rf"--repeat_data=true"):
        train.main(run_args(tiny_data, str(tmp_path / "a"), max_steps=steps))
    train.main(run_args(tiny_data, str(tmp_path / "b"), max_steps=steps, stop_at=1,
                        repeat_data=True))
    # continued pretraining reads on in its source's stream: the blocks left are fewer
    base = str(tmp_path / "base")
    train.main(run_args(tiny_data, base, max_steps=8))
    left = (n - 16) // 2
    with pytest.raises(SystemExit, match=rf"from block 16 of {n:,} it fits {left:,} steps"):
        train.main(run_args(tiny_data, str(tmp_path / "cpt"), init_from=f"{base}/ckpt.pt",
                            objective="mlm", switch_to="none", max_steps=left + 1))

@pytest.mark.slow
def test_intermediate_checkpoints_hold_the_weights_of_their_step(tiny_data, tmp_path):
    """keep_checkpoints: ckpt_<step>.pt holds the weights after that step (the same as a run
    stopped there), without the optimizer state, and loads like any checkpoint."""
    from mlm_vs_clm.checkpoints import load_model
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    train.main(run_args(tiny_data, str(whole), keep_checkpoints="2,5"))
    train.main(run_args(tiny_data, str(stopped), stop_at=5))
    assert sorted(p.name for p in whole.glob("ckpt*.pt")) == ["ckpt.pt", "ckpt_2.pt", "ckpt_5.pt"]
    model, _, kept = load_model(str(whole / "ckpt_5.pt"))
    assert kept["step"] == 5 and "optimizer" not in kept and kept["objective"] == "mlm"
    reference = torch.load(stopped / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(w, reference[k]) for k, w in model.state_dict().items())
    train.main(run_args(tiny_data, str(tmp_path / "every"), keep_checkpoints="every:4"))
    assert {p.name for p in (tmp_path / "every").glob("ckpt_*.pt")} == {"ckpt_4.pt", "ckpt_8.pt"}
    for bad in ("every:x", "0", "9", "2;5"):
        with pytest.raises(SystemExit, match="keep_checkpoints"):
            train.main(run_args(tiny_data, str(tmp_path / "bad"), keep_checkpoints=bad))

@pytest.mark.slow
def test_continued_pretraining_carries_the_adamw_state_unless_told(tiny_data, tmp_path):
    base = tmp_path / "base"
    train.main(run_args(tiny_data, str(base), max_steps=4, switch_at=2, keep_checkpoints="2"))
    cpt = dict(init_from=base / "ckpt.pt", objective="mlm", switch_to="none", max_steps=4)

    def adam_steps(out):
        state = torch.load(out / "ckpt.pt", weights_only=True)["optimizer"]["state"]
        return {s["step"].item() for s in state.values()}
    train.main(run_args(tiny_data, str(tmp_path / "carried"), **cpt))
    train.main(run_args(tiny_data, str(tmp_path / "empty"), **cpt, load_optimizer=False))
    assert adam_steps(tmp_path / "carried") == {8} and adam_steps(tmp_path / "empty") == {4}
    with pytest.raises(SystemExit, match="holds no optimizer state.*--load_optimizer=false"):
        train.main(run_args(tiny_data, str(tmp_path / "kept"), **dict(cpt, init_from=base /
                                                                      "ckpt_2.pt")))
    sharded = torch.load(base / "ckpt.pt", weights_only=True)
    sharded["train_config"]["fsdp"] = True  # as an FSDP run would have written it
    torch.save(sharded, tmp_path / "fsdp.pt")
    with pytest.raises(SystemExit, match="fsdp=True.*--fsdp=true or --load_optimizer=false"):
        train.main(run_args(tiny_data, str(tmp_path / "mixed"),
                            **dict(cpt, init_from=tmp_path / "fsdp.pt")))

def test_paper_presets_hold_their_longest_run_and_the_cpt_budgets_are_valid():
    """Every preset's data holds its longest run, the 42k pretraining plus the +22k continued
    pretraining, read once; the three CPT budgets, written as docs/experiment.md gives them, are
    valid settings."""
    for size in ("210m", "610m", "1b"):
        preset = os.path.join(HERE, "config", f"{size}.py")
        cfg = settings.configure(train.TrainConfig, [preset])
        tokens_per_step = cfg.total_batch_size * cfg.block_size
        assert (cfg.max_steps + 22_000) * tokens_per_step <= 0.95 * cfg.data_tokens
        for steps, warmup, decay in ((2000, 20, 1980), (12000, 120, 2000), (22000, 220, 2000)):
            cpt = settings.configure(train.TrainConfig, [
                preset, os.path.join(HERE, "config", "cpt.py"), f"--init_from={__file__}",
                f"--max_steps={steps}", f"--warmup_steps={warmup}", f"--decay_steps={decay}"])
            settings.check(cpt)
            assert (cpt.objective, cpt.switch_to, cpt.mask_ratio, cpt.load_optimizer) == \
                ("mlm", "none", 0.4, True)

@pytest.mark.slow
def test_compiled_run_has_static_shapes_and_no_graph_break(tiny_data, tmp_path):
    """--compile=true on the CPU: the model and its loss in one graph per objective for training
    and one for validation, whatever the switch and the steps; no graph break, no recompile."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    train.main(run_args(tiny_data, str(tmp_path), compile="true", max_steps=6, eval_interval=3))
    assert counters["stats"]["unique_graphs"] == 4  # {clm, mlm} x {training, validation}
    assert sum(counters["graph_break"].values()) == 0
    steps, evals = read_log(str(tmp_path))
    assert [r["objective"] for r in steps] == ["clm"] * 3 + ["mlm"] * 3 and len(evals) == 3

def torchrun_train(args, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={nproc}", os.path.join(HERE, "train.py"), *args],
                            capture_output=True, text=True, env=env, cwd=HERE, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

@pytest.mark.slow
@pytest.mark.parametrize("fsdp, eval_batches", [("true", 1), ("false", 3)])
def test_validation_cannot_deadlock(tiny_data, tmp_path, fsdp, eval_batches):
    """eval_batches below the number of processes, or not a multiple of it: every process still
    runs every validation forward (FSDP gathers weights from all of them), and the losses are
    those of one process over the same eval_batches micro-batches."""
    settings = dict(eval_batches=eval_batches, max_steps=4, eval_interval=2, total_batch_size=4)
    train.main(run_args(tiny_data, str(tmp_path / "one"), **settings))
    torchrun_train(run_args(tiny_data, str(tmp_path / "two"), fsdp=fsdp, **settings))
    one, two = read_log(str(tmp_path / "one"))[1], read_log(str(tmp_path / "two"))[1]
    for a, b in zip(one, two):
        assert b["val_clm"] == pytest.approx(a["val_clm"], rel=1e-4)
        assert b["val_mlm"] == pytest.approx(a["val_mlm"], rel=1e-4)

@pytest.mark.slow
def test_fsdp_in_bf16_matches_ddp_in_bf16(tiny_data, tmp_path):
    """FSDP2 gathers weights and gradients in bfloat16 and reduces in float32; under bf16 autocast
    its losses follow DDP's within bf16 precision."""
    settings = dict(dtype="bfloat16", total_batch_size=4)
    torchrun_train(run_args(tiny_data, str(tmp_path / "ddp"), **settings))
    torchrun_train(run_args(tiny_data, str(tmp_path / "fsdp"), fsdp="true", **settings))
    ddp, fsdp = read_log(str(tmp_path / "ddp"))[0], read_log(str(tmp_path / "fsdp"))[0]
    assert [r["loss"] for r in fsdp] == pytest.approx([r["loss"] for r in ddp], rel=2e-2)
