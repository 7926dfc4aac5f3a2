"""
The optional experiment tracker (--wandb_project, runs.RunLog): it logs what log.jsonl holds.
"""

import json
import os
import struct
from types import SimpleNamespace
import subprocess
import sys
import types

import pytest

import train
from tests.helpers import HERE, run_args

def test_wandb_gets_what_log_jsonl_holds(tiny_data, tmp_path, monkeypatch):
    """A stand-in for the wandb module records what train.py sends it."""
    calls = {"log": [], "finish": 0}

    class Run:
        def log(self, values, step):
            calls["log"].append({"step": step, **values})

        def finish(self):
            calls["finish"] += 1

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    # MFU NaN: left out
    monkeypatch.setattr(train.parallel, "peak_flops", lambda device: float("nan"))
    out = tmp_path / "run"
    train.main(run_args(tiny_data, str(out), max_steps=4, switch_at=2, wandb_project="mlm-vs-clm"))
    with open(out / "log.jsonl") as f:
        logged = [{k: v for k, v in json.loads(line).items() if v is not None} for line in f]
    assert calls["log"] == logged and calls["finish"] == 1
    assert [r["objective"] for r in calls["log"] if "objective" in r] == ["clm"] * 2 + ["mlm"] * 2
    assert {"val_clm", "val_mlm"} <= set(calls["log"][-1])
    assert calls["init"]["project"] == "mlm-vs-clm" and calls["init"]["name"] == "run"
    assert calls["init"]["config"]["switch_step"] == 2 and calls["init"]["dir"] == str(out)

def test_a_missing_wandb_names_the_package(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(SystemExit, match="pip install wandb"):
        train.main(run_args(tiny_data, str(tmp_path / "run"), wandb_project="x"))

def test_wandb_without_a_login_says_how_to_log_in(tiny_data, tmp_path, monkeypatch):
    def init(**kwargs):
        raise RuntimeError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(init=init))
    with pytest.raises(SystemExit) as e:
        train.main(run_args(tiny_data, str(tmp_path / "run"), wandb_project="x"))
    assert "wandb login" in str(e.value) and "WANDB_MODE=offline" in str(e.value)
    assert "\n" not in str(e.value)

def wandb_history(path):
    """The rows a .wandb file holds (wandb has no reader API for offline runs): LevelDB-log
    framed protobuf records after a 7-byte header, in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = open(path, "rb").read()
    assert struct.unpack("<4sHB", data[:7])[:2] == (b":W&B", 0xBEE1)
    block, pos, buf, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (2, 3):
            continue
        record = pb.Record()
        record.ParseFromString(buf)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows

@pytest.mark.slow
def test_wandb_offline_run_holds_the_log(tiny_data, tmp_path):
    """The real wandb, offline (no account, no network): its run file holds every logged row."""
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, os.path.join(HERE, "train.py"),
                             *run_args(tiny_data, str(out), max_steps=4, switch_at=2,
                                       wandb_project="mlm-vs-clm")],
                            capture_output=True, text=True, env=env, cwd=HERE, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    rows = wandb_history(run_file)
    with open(out / "log.jsonl") as f:
        logged = [json.loads(line) for line in f]
    by_step = {}
    for record in logged:
        by_step.setdefault(record["step"], {}).update(record)
    for row in rows:
        expected = by_step[row["_step"]]
        assert all(row[k] == expected[k] for k in row if not k.startswith("_")), row
    assert {row["_step"] for row in rows} == set(by_step)
    assert any(row.get("objective") == "mlm" for row in rows)
