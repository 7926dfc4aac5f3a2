"""The README's and the docs' short commands, run as written in a copy of the repository, in the
order a newcomer meets them: none of them may fail. Each must appear verbatim in its page."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers import HERE

pytestmark = pytest.mark.slow

# (page, what runs): a command of one of the page's code blocks (its trailing "# comment" aside),
# or "block:<line>", the whole code block holding that line, run as one shell script
COMMANDS = [
    ("README.md", "python train.py --help"),
    ("README.md", "python train.py"),
    ("README.md", "python sample.py --init_from=out/demo/ckpt.pt"),
    ("README.md", "python finetune.py --init_from=out/demo/ckpt.pt --task=demo_sc --lrs=2e-3 "
                  "--seeds=3 --batch_size=16 --max_steps=80"),
    ("README.md", "python -m mlm_vs_clm.export --init_from=out/demo/ckpt.pt"),
    ("docs/pretraining.md", "python train.py --objective=mlm --switch_to=none --out_dir=out/mlm"),
    ("docs/data.md", "python data.py --help"),
    ("docs/finetuning.md", "block:mkdir -p out/random"),
    ("docs/huggingface.md", "python -m mlm_vs_clm.export --init_from=out/demo/ckpt.pt "
                            "--kind=decoder --out_dir=out/demo/hf_decoder"),
    ("docs/sample.md", 'python sample.py --show=fill --text="Raise a <|mask|> if the file does '
                       'not exist."'),
    ("docs/sample.md", "python sample.py --init_from=hf:out/demo/hf"),
    ("docs/experiment.md", "python experiment.py --help"),
]

def code_blocks(page: str) -> list[list[str]]:
    text = open(os.path.join(HERE, page), encoding="utf-8").read()
    return [block.strip("\n").splitlines() for block in re.findall(r"^```[^\n]*\n(.*?)^```", text,
                                                                    re.M | re.S)]

def command_of(line: str) -> str:
    """A code line as a reader copies it: no "$ " prompt, no trailing comment."""
    return re.sub(r"\s+# .*$", "", line.removeprefix("$ ")).strip()

def script(page: str, what: str) -> str:
    blocks = code_blocks(page)
    if what.startswith("block:"):
        found = [b for b in blocks if what.removeprefix("block:") in b]
        assert found, f"{page} has no code block with {what!r}"
        return "\n".join(found[0])
    assert any(command_of(line) == what for b in blocks for line in b), \
        f"{page} no longer shows {what!r}: update the page or this test"
    return what

@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """The files a clone would hold (tracked, or new and not ignored), nothing the tests ran."""
    root = tmp_path_factory.mktemp("checkout")
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=HERE, capture_output=True, text=True, check=True).stdout
    for name in listed.splitlines():
        if os.path.isfile(os.path.join(HERE, name)):
            os.makedirs(root / os.path.dirname(name), exist_ok=True)
            shutil.copy2(os.path.join(HERE, name), root / name)
    return root

def test_the_pages_commands_run_as_written(checkout, tmp_path):
    (tmp_path / "bin").mkdir()
    os.symlink(sys.executable, tmp_path / "bin" / "python")  # "python" is this interpreter
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", OMP_NUM_THREADS="1")
    env.pop("MLM_VS_CLM_PARENT", None)
    for page, what in COMMANDS:
        result = subprocess.run(["bash", "-euc", script(page, what)], cwd=checkout, env=env,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{page}: {what}\n{result.stdout[-2000:]}{result.stderr}"
    assert os.path.exists(checkout / "out" / "finetune" / "demo_sc" / "report.json")
    assert os.path.exists(checkout / "out" / "random" / "ckpt.pt")
