"""
Checkpoints and the log of a run: one checkpoint format for every run (single process, DDP or
FSDP), which resume, continued pretraining, fine-tuning and export all read.

- `save_checkpoint` writes atomically (files.py) and refuses a checkpoint with a NaN or an infinity.
- `read_checkpoint` unpickles tensors and plain containers only (`torch.load(weights_only=True)`): a
  checkpoint someone hands you cannot run code on your machine, and a file that is not one of ours
  stops with one line that says what it is.
- `load_checkpoint` rebuilds the model from the file alone, its config being saved inside.
- `open_log` rewrites a resumed run's log.jsonl atomically, up to its checkpoint's step.
"""

import math
import os
import pickle
import zipfile
from dataclasses import asdict, fields

import torch

import files
from model import ModelConfig, Transformer

# Every checkpoint train.py writes is a dict with this tag, the model config as a plain dict (so
# the model rebuilds exactly from the file alone) and the weights; train.py adds the optimizer
# state, the step, the data position, the tokenizer and its settings, to resume.
CHECKPOINT_FORMAT = "mlm-vs-clm/1"


def checkpoint_payload(model: "Transformer", state_dict: dict | None = None, **extra) -> dict:
    """state_dict: the full weights where model.state_dict() holds only this process's shards
    (FSDP)."""
    return {"format": CHECKPOINT_FORMAT, "model_config": asdict(model.config),
            "model": model.state_dict() if state_dict is None else state_dict, **extra}


def read_checkpoint(path: str, device="cpu") -> dict:
    """The dict in one of our checkpoint files, memory-mapped (its tensors are read when used),
    checked to be ours. Only tensors and plain containers are unpickled (weights_only=True): a
    checkpoint someone hands you cannot run code on your machine."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    # torch.save writes a zip archive, whose directory is at its very end
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a complete PyTorch checkpoint (no zip directory at its "
                         "end): a truncated copy, or not a checkpoint at all; give a ckpt.pt that "
                         "train.py wrote")
    try:
        # mmap: under FSDP every process loads the full checkpoint; mapped, they share one copy in
        # the page cache
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} holds Python objects other than tensors and plain containers; "
                         "they were not loaded, since unpickling them could run code: only "
                         "checkpoints train.py wrote are read") from None
    except Exception as e:  # a damaged archive fails in many ways, all with one cure
        raise ValueError(f"{path} is a damaged checkpoint ({str(e).splitlines()[0][:100]}): "
                         "copy it again, or use an earlier one") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint of this project (no format tag "
                         f"{CHECKPOINT_FORMAT!r}); train.py writes them as out_dir/ckpt.pt")
    return ckpt


def load_checkpoint(path: str, device="cpu"):
    """Rebuild a model from one of our checkpoints; returns (model, the whole checkpoint dict)."""
    ckpt = read_checkpoint(path, device)
    return model_from_checkpoint(ckpt, path).to(device), ckpt


def model_from_checkpoint(ckpt: dict, path: str) -> "Transformer":
    """The model a checkpoint dict describes (read_checkpoint), with its weights; path is for
    messages."""
    unknown = set(ckpt["model_config"]) - {f.name for f in fields(ModelConfig)}
    if unknown:
        raise ValueError(f"{path} has model config fields this code does not know: "
                         f"{sorted(unknown)}")
    try:
        model = Transformer(ModelConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError) as e:  # an edited file: config and weights disagree
        raise ValueError(f"{path}: its weights do not fit its model config "
                         f"({str(e).splitlines()[0][:160]})") from None
    return model


def first_non_finite(tree, name: str = "") -> str | None:
    """The name of the first floating-point tensor in
    nested dicts and lists that holds a NaN or an inf."""
    if isinstance(tree, torch.Tensor):
        return name if tree.is_floating_point() and not torch.isfinite(tree).all() else None
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return None
    for key, value in items:
        bad = first_non_finite(value, f"{name}.{key}" if name else str(key))
        if bad is not None:
            return bad
    return None


def save_checkpoint(payload: dict, path: str) -> None:
    bad = first_non_finite(payload)
    if bad is not None:
        raise FloatingPointError(f"{bad} holds non-finite values at step {payload['step']}, "
                                 f"so it was not saved")
    files.write_atomically(path, lambda tmp: torch.save(payload, tmp))


def last_good(ckpt_path: str, step: int | None) -> str:
    if step is None:
        return f"No checkpoint of this run was written yet ({ckpt_path} does not exist)"
    return (f"The last good checkpoint is {ckpt_path} (step {step}): resume from it with "
            f"--init_from=resume")


def open_log(path: str, resumed_step: int | None):
    """log.jsonl for appending. A resumed run keeps its records up to the checkpoint's step (what an
    interrupted run wrote after it is redone); a new run starts an empty log. Either way the file is
    replaced atomically, so a crash here loses nothing."""
    records = files.read_json_lines(path) if resumed_step is not None else []
    kept = [r for r in records if r.get("step", math.inf) <= resumed_step]
    files.write_text_atomically(path, "".join(files.json_line(r) for r in kept))
    return open(path, "a", encoding="utf-8")


def kept_steps(spec: str, max_steps: int) -> set[int]:
    """The steps whose weights are kept as ckpt_<step>.pt besides the resumable ckpt.pt: the
    paper's intermediate checkpoints (610m-clm-42k-1000 is step 1,000 of a 42k CLM run), which
    its data-efficiency figure fine-tunes."""
    text, spec = spec, spec.replace(" ", "")
    try:
        if spec.startswith("every:"):
            every = int(spec.removeprefix("every:"))
            steps = set(range(every, max_steps + 1, every)) if every > 0 else {0}
        else:
            steps = {int(float(x)) for x in spec.split(",") if x}
    except ValueError:
        raise ValueError(f"keep_checkpoints={text!r} must be steps, "
                         "\"1000,5000\", or \"every:N\"") from None
    if any(not 0 < step <= max_steps for step in steps):
        raise ValueError(f"keep_checkpoints={text!r} must name steps in "
                         f"[1, max_steps={max_steps}]")
    return steps
