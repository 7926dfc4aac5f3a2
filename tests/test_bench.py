"""
Benchmarks (bench.py): every code path for a step or two on the test preset, no timing assertions.
"""

import json

import pytest
import torch

import bench


@pytest.mark.slow
def test_bench_comparisons_scaling_and_report(tmp_path, capsys):
    out, trace = tmp_path / "bench.txt", tmp_path / "trace.json"
    bench.main(["--model=test", "--block_size=32", "--batch_size=2", "--steps=1", "--warmup=1",
                "--compare=objective,head,attention,loader", "--scaling=true",
                "--scaling_models=test", "--scaling_contexts=16,32", f"--out={out}",
                f"--profile={trace}"])
    text = out.read_text()
    for expected in ("mlm, dense head", "clm, manual attention", "MLM step vs CLM step",
                     "MLM sparse head vs dense head", "SDPA vs manual attention, MLM",
                     "data loader alone", "command: python bench.py"):
        assert expected in text
    # the two base rows and the 2 x 2 scaling rows
    assert text.count("\nclm ") + text.count("\nmlm ") >= 2 + 4
    assert json.loads(trace.read_text())["traceEvents"]
    bench.main(["--model=test", "--block_size=16", "--batch_size=2", "--steps=1", "--warmup=0",
                "--compare=", "--json=true"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")]
    assert [r["objective"] for r in rows] == ["clm", "mlm"] and \
        all(r["tokens_per_s"] > 0 for r in rows)


@pytest.mark.slow
def test_bench_compiled_step_on_cpu(tmp_path):
    """torch.compile's CPU backend runs the same train_step as the GPU one would."""
    out = tmp_path / "bench.txt"
    bench.main(["--model=test", "--block_size=16", "--batch_size=2", "--steps=1", "--warmup=1",
                "--compare=compile", "--compile=false", f"--out={out}"])
    assert "compiled vs eager, CLM" in out.read_text() and "mlm, compiled" in out.read_text()


def test_bench_rejects_unknown_comparison_and_gpu_suite_without_gpu():
    with pytest.raises(SystemExit, match="unknown comparison"):
        bench.main(["--compare=objective,speed"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA device"):
            bench.main(["--suite=gpu"])
