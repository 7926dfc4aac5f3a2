"""What the tests share: the tiny vocabulary and model of the objective tests, the settings of a
short pretraining run, and builders of checkpoints, task files and fine-tuning families. Everything
runs on the CPU with tiny models and data built on the spot; nothing is downloaded."""

import json
import os
import random
from contextlib import nullcontext

import pytest
import torch

import finetune as ft
import model
import objectives as O
from mlm_vs_clm import checkpoints
from mlm_vs_clm.task_data import family_class
from mlm_vs_clm.tokenizer import get_tokenizer

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
# eot, mask, pad last, as the tokenizers order them
VOCAB = O.Vocab(size=128, mask_id=126, special_ids=(125, 126, 127), pad_id=127)

def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return model.Transformer(model.model_config("test", vocab_size=VOCAB.size, **overrides))

def random_tokens(shape, seed=0, specials_every=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB.size - len(VOCAB.special_ids), shape, generator=g)
    if specials_every:
        tokens[:, ::specials_every] = 125  # end-of-text between documents, as in packed blocks
        tokens[:, 1::specials_every] = 127
    return tokens

# -------------------------------------------------------------------------------------------------
# Pretraining runs (train.py)

def run_args(data_dir, out_dir, **overrides):
    settings = dict(data_dir=data_dir, out_dir=out_dir, model="test", block_size=32, batch_size=2,
                    max_steps=8, warmup_steps=2, decay_steps=2, switch_at=0.5, eval_interval=4,
                    eval_batches=2, lr=3e-3, progress=False) | overrides
    return [f"--{k}={v}" for k, v in settings.items()]

def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if "loss" in r], [r for r in records if "val_clm" in r]

# -------------------------------------------------------------------------------------------------
# Fine-tuning (finetune.py, tasks.py)

TOK = get_tokenizer("cl100k_8k")
FILLER = "the a movie film story plot actors scene was is and it of very quite".split()

def make_checkpoint(path, block_size=64, seed=0):
    torch.manual_seed(seed)
    m = model.Transformer(model.model_config("test", vocab_size=TOK.n_vocab,
                                             block_size=block_size))
    torch.save(checkpoints.checkpoint_payload(m, tokenizer=TOK.meta()), path)
    return str(path)

def make_family(name, records, max_len=64, labels=None, **settings):
    cfg = ft.FinetuneConfig(progress=False, **settings)
    rows = [(f"train.jsonl, line {i + 1}", r) for i, r in enumerate(records)]
    family = family_class(name, cfg.protocol)
    return family(cfg, TOK, rows, torch.device("cpu"), nullcontext, max_len, labels), cfg

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
