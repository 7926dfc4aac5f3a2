"""One checkpoint format (atomic, never a NaN, weights_only=True, model config inside) and the one
loader of it or hf:DIR. docs/pretraining.md#checkpoints-and-failures-what-is-guaranteed."""

import glob
import hashlib
import os
import pickle
import zipfile
from dataclasses import asdict, fields
from typing import NamedTuple

import torch

from mlm_vs_clm import files
from mlm_vs_clm.hf import check_fit, load_hf
from mlm_vs_clm.tokenizer import Tokenizer, get_tokenizer, tokenizer_of
from model import ModelConfig, Transformer

CHECKPOINT_FORMAT = "mlm-vs-clm/1"  # tags checkpoint_payload's dict: config, weights, extras

def checkpoint_payload(model: Transformer, state_dict: dict | None = None, **extra) -> dict:
    """state_dict: the full weights where model.state_dict() holds only this rank's (FSDP)."""
    return {"format": CHECKPOINT_FORMAT, "model_config": asdict(model.config),
            "model": model.state_dict() if state_dict is None else state_dict, **extra}

def read_checkpoint(path: str, device="cpu") -> dict:
    """Our checkpoint's dict, memory-mapped; weights_only=True: a file from others runs no code."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a complete PyTorch checkpoint (no zip directory at its "
                         "end): a truncated copy, or no checkpoint; give a ckpt.pt train.py wrote")
    try:
        # mmap: under FSDP every process loads it all; mapped, they share one copy in the page cache
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} holds Python objects besides tensors and plain containers: not "
                         "loaded, as unpickling could run code; give one train.py wrote") from None
    except Exception as e:  # a damaged archive fails in many ways, all with one cure
        raise ValueError(f"{path} is a damaged checkpoint ({str(e).splitlines()[0][:100]}): "
                         "copy it again, or use an earlier one") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint of this project (no format tag "
                         f"{CHECKPOINT_FORMAT!r}); train.py writes them as out_dir/ckpt.pt")
    return ckpt

def identity(spec: str, ckpt: dict) -> str:
    """What a model is, wherever it lies: train.py's run id and step, else its files' sha256."""
    if ckpt.get("run_id"):
        return f"{ckpt['run_id']}@{ckpt['step']}"
    path, digest = spec.removeprefix("hf:"), hashlib.sha256()
    for file in sorted(glob.glob(os.path.join(path, "*"))) if os.path.isdir(path) else [path]:
        if os.path.isfile(file):
            digest.update(os.path.basename(file).encode())
            with open(file, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()[:16]

def source_problem(setting: str, spec: str) -> str | None:
    """What is wrong with a setting that names a checkpoint file or hf:DIR, before any work."""
    path = spec.removeprefix("hf:")
    if spec.startswith("hf:"):
        return None if os.path.isdir(path) else f"--{setting}={spec}: no directory {path}"
    if os.path.isdir(spec):
        return (f"--{setting}={spec} is a directory: write hf:{spec} for a Hugging Face "
                "checkpoint directory, or give a checkpoint file (out_dir/ckpt.pt)")
    return None if os.path.isfile(spec) else f"--{setting}={spec}: no checkpoint at {spec}"

class Loaded(NamedTuple):
    """A model with the tokenizer it was trained with, and its checkpoint ({} for hf:DIR)."""
    model: Transformer
    tokenizer: Tokenizer
    checkpoint: dict

def load_model(spec: str, device="cpu", head: bool = True) -> Loaded:
    """Our checkpoint file (fine-tuned: its body) or hf:DIR; head=False: its LM head optional."""
    if spec.startswith("hf:"):
        tok = get_tokenizer(spec)
        return Loaded(load_hf(spec.removeprefix("hf:"), tok, head).to(device), tok, {})
    if os.path.isdir(spec):
        raise ValueError(f"{spec} is a directory: write hf:{spec} for a Hugging Face checkpoint "
                         "directory, or give a checkpoint file (out_dir/ckpt.pt)")
    ckpt = read_checkpoint(spec)
    tok, model = tokenizer_of(ckpt, spec), model_from_checkpoint(ckpt, spec)
    if model.config.vocab_size != tok.n_vocab:
        raise ValueError(f"{spec}: the model has {model.config.vocab_size} token ids and its "
                         f"tokenizer {tok.name} {tok.n_vocab}: they do not belong together")
    return Loaded(model.to(device), tok, ckpt)

def model_from_checkpoint(ckpt: dict, path: str) -> Transformer:
    """The model of a checkpoint dict, config and weights checked to agree before any allocation."""
    config, weights = ckpt.get("model_config"), ckpt.get("model")
    if not isinstance(config, dict) or not isinstance(weights, dict):
        raise ValueError(f"{path} has no model_config or no model weights: not a checkpoint "
                         "train.py or finetune.py wrote")
    if unknown := set(config) - {f.name for f in fields(ModelConfig)}:
        raise ValueError(f"{path} has model config fields unknown to this code: {sorted(unknown)}")
    try:
        cfg = ModelConfig(**config)
        for name, w in weights.items():
            if not isinstance(w, torch.Tensor) or not w.is_floating_point():
                raise ValueError(f"{name} is {getattr(w, 'dtype', type(w))}, not a float tensor")
        check_fit(cfg, {k: tuple(w.shape) for k, w in weights.items()}, path)
        if bad := first_non_finite(weights):
            raise ValueError(f"{bad} holds NaN or infinite values")
        model = Transformer(cfg)
        model.load_state_dict(weights)
    except (ValueError, TypeError, RuntimeError) as e:  # an edited file: config, weights disagree
        message = str(e).splitlines()[0].removeprefix(f"{path}: ")[:160]
        raise ValueError(f"{path}: its weights do not fit its model config ({message})") from None
    return model

def first_non_finite(tree, name: str = "") -> str | None:
    """The name of the first float tensor in nested dicts and lists that holds a NaN or an inf."""
    if isinstance(tree, torch.Tensor):
        return name if tree.is_floating_point() and not torch.isfinite(tree).all() else None
    if isinstance(tree, (list, tuple)):
        tree = dict(enumerate(tree))
    for key, value in tree.items() if isinstance(tree, dict) else ():
        if (bad := first_non_finite(value, f"{name}.{key}" if name else str(key))) is not None:
            return bad
    return None

def save_checkpoint(payload: dict, path: str) -> None:
    """Writes a checkpoint that will load: finite, and with a model config that builds."""
    if (bad := first_non_finite(payload)) is not None:
        raise FloatingPointError(f"{bad} holds non-finite values at step {payload['step']}, "
                                 f"so it was not saved")
    ModelConfig(**payload["model_config"])  # raises, naming what is wrong, before anything is saved
    files.write_atomically(path, lambda tmp: torch.save(payload, tmp))

def kept_steps(spec: str, max_steps: int) -> set[int]:
    """Steps kept as ckpt_<step>.pt: the paper's intermediate checkpoints (data efficiency)."""
    text, spec = spec, spec.replace(" ", "")
    try:
        if spec.startswith("every:"):
            every = int(spec.removeprefix("every:"))
            steps = set(range(every, max_steps + 1, every)) if every > 0 else {0}
        else:
            steps = {int(float(x)) for x in spec.split(",") if x}
    except ValueError:
        raise ValueError(f'keep_checkpoints={text!r}: use steps "1000,5000" or "every:N"') from None
    if any(not 0 < step <= max_steps for step in steps):
        raise ValueError(f"keep_checkpoints={text!r} must name steps in [1, max_steps={max_steps}]")
    return steps
