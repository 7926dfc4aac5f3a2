"""Benchmarks (bench.py): every path on the test preset for a few steps, no timing assertions."""

import importlib.util
import json

import pytest
import torch

import bench
from mlm_vs_clm.tokenizer import get_tokenizer

SMALL = ["--model=test", "--block_size=32", "--batch_size=2", "--steps=8"]

@pytest.mark.slow
def test_real_step_report(tmp_path, capsys):
    """train.py's own loop on synthetic files: both phases timed, the head's share, the SDPA
    kernel, compiled with no graph break and two graphs per objective."""
    out = tmp_path / "bench.txt"
    rows = bench.main(SMALL + ["--compile=true", f"--out={out}"])
    run = rows[0]
    assert run["clm_tokens_per_s"] > 0 and run["mlm_tokens_per_s"] > 0
    assert run["graphs"] == 4 and run["graph_breaks"] == 0 and run["compile_s"] > 0
    assert 0 < run["clm_head_time"] < 1 and 0 < run["mlm_head_time"] < 1
    assert rows[1]["sdpa at the 1b shape"]["causal"] in ("flash", "efficient", "cudnn", "math")
    assert "command: python bench.py" in out.read_text()
    bench.main(SMALL + ["--compile=false", "--json=true"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()
               if line.startswith("{")]
    assert printed[-2]["graphs"] == 0 and printed[-2]["mlm_tokens_per_s"] > 0

def test_memory_model_grows_with_the_micro_batch_and_shards_under_fsdp():
    estimate = bench.memory_model("test", 8195, 64, 8, bench.activation_bytes("test"))
    small, large = estimate(1), estimate(4)
    assert large["activations_gb"] == pytest.approx(
        4 * small["activations_gb"] - 3 * bench.activation_bytes("test")["per_block"] * 2 / 2**30)
    assert large["ddp_gb"] > small["ddp_gb"] > small["fsdp_gb"]
    rows = bench.main(["--memory=true", "--memory_presets=test", "--batch_size=4",
                       "--block_size=64", "--gpu_gb=0.05"])
    assert rows[0]["micro_batch"] == 4 and rows[0]["largest_ddp"] >= 1
    # a paper preset: its config file's shape and tokenizer (cl100k), whatever --tokenizer says
    paper = bench.main(["--memory=true", "--memory_presets=210m", "--tokenizer=cl100k_8k"])[0]
    cl100k = bench.memory_model("210m", get_tokenizer("cl100k").n_vocab, 2048, 8,
                                bench.activation_bytes("test"))
    assert paper["block_size"] == 2048 and paper["params"] == cl100k(1)["params"]

@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="needs transformers")
def test_compare_with_transformers():
    row = bench.main(SMALL + ["--compile=false", "--compare=transformers"])[-1]
    assert row["clm speed-up"] > 0 and row["mlm speed-up"] > 0
    assert 0 < row["matmul share of our clm step"] <= 1

def test_bench_rejects_bad_settings_and_gpu_suite_without_gpu():
    with pytest.raises(SystemExit, match="--compare"):
        bench.main(["--compare=speed"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA device"):
            bench.main(["--suite=gpu"])
