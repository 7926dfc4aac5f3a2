"""The fixtures of the tests under tests/ (their helpers are in helpers.py): one thread per test
and a tiny prepared corpus. pytest.ini puts the repository root on sys.path and marks slow tests:

    python -m pytest -q                  # everything
    python -m pytest -q -m "not slow"    # the fast loop
"""

import random

import pytest
import torch

import data

@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second thread gains nothing, and on a busy machine the threads of
    each small op wait on each other (20x slower with 2 threads while other processes ran)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

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
