"""
What the test files under tests/ share: the repository root on sys.path, the `slow` marker, one
thread per test, a tiny prepared corpus, and the helpers that build runs, checkpoints and task
files. Everything runs on the CPU with tiny models and data built on the spot; nothing is
downloaded.

    python -m pytest -q test_objectives.py tests                 # everything
    python -m pytest -q -m "not slow" test_objectives.py tests   # the fast loop

Test files import the helpers below with `from conftest import ...`.
"""

import json
import os
import random
import sys
from contextlib import nullcontext

import pytest
import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
if HERE not in sys.path:  # the project's modules live there, not in an installed package
    sys.path.insert(0, HERE)

import checkpoints  # noqa: E402
import data  # noqa: E402
import finetune as ft  # noqa: E402
import model  # noqa: E402
from finetune import FAMILIES  # noqa: E402
# the tiny model of the objective tests, and one thread for every test as there
from test_objectives import VOCAB, one_thread, random_tokens, tiny_model  # noqa: E402, F401


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: takes seconds (subprocesses, torchrun, transformers, the real docstring "
                   "corpus); deselect with -m 'not slow'")


# --------------------------------------------------------------------------------------------------
# Pretraining runs (train.py)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A few thousand tokens of word salad, prepared with the real tokenizer: enough blocks for
    short runs."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = ("the encoder sees both sides while a decoder looks left only and predicts what comes "
             "next").split()
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words)
                                                       for _ in range(rng.randint(100, 400))))
    data.prepare(str(root / "*.txt"), str(root / "data"), "cl100k_8k")
    return str(root / "data")


def run_args(data_dir, out_dir, **overrides):
    settings = dict(data_dir=data_dir, out_dir=out_dir, model="test", block_size=32, batch_size=2,
                    max_steps=8, warmup_steps=2, decay_steps=2, switch_at=0.5, eval_interval=4,
                    eval_batches=2, lr=3e-3, progress=False) | overrides
    return [f"--{k}={v}" for k, v in settings.items()]


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if "loss" in r], [r for r in records if "val_clm" in r]


# --------------------------------------------------------------------------------------------------
# Fine-tuning (finetune.py, tasks.py)

TOK = data.get_tokenizer("cl100k_8k")
FILLER = "the a movie film story plot actors scene was is and it of very quite".split()


def make_checkpoint(path, block_size=64, seed=0):
    torch.manual_seed(seed)
    m = model.Transformer(model.model_config("test", vocab_size=TOK.n_vocab,
                                             block_size=block_size))
    torch.save(checkpoints.checkpoint_payload(m, tokenizer=TOK.meta()), path)
    return str(path)


def make_family(name, records, max_len=64, **settings):
    cfg = ft.FinetuneConfig(progress=False, **settings)
    rows = [(f"train.jsonl, line {i + 1}", r) for i, r in enumerate(records)]
    return FAMILIES[name](cfg, TOK, rows, torch.device("cpu"), nullcontext, max_len), cfg


def rows(records, name="file.jsonl"):
    return [(f"{name}, line {i + 1}", r) for i, r in enumerate(records)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def tiny_body(block_size=64):
    torch.manual_seed(0)
    return model.Transformer(model.model_config("test", vocab_size=TOK.n_vocab,
                                                block_size=block_size))


def sc_files(tmp_path, n=64):
    rng = random.Random(1)
    records = [{"text": " ".join(rng.choices(FILLER, k=5) + [w]), "label": int(w == "good")}
               for w in rng.choices(["good", "bad"], k=n)]
    return (write_jsonl(tmp_path / "train.jsonl", records),
            write_jsonl(tmp_path / "test.jsonl", records[:16]))


def error_of(argv):
    with pytest.raises(SystemExit) as e:
        ft.main(argv + ["--progress=False"])
    return str(e.value)
