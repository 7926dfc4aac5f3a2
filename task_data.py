"""
Where fine-tuning records come from: JSON-lines files (one record a line, in the schemas below), the
paper's datasets on the Hugging Face hub (through the optional `datasets` package), or the offline
demo tasks built from held-out docstrings (docstrings.py). Then the validation split held out of the
training records.

  sc  {"text": str, "text_pair": str (sentence-pair tasks only), "label": str | int}
  tc  {"words": [str, ...], "tags": [str, ...]}, one BIO tag per word: "O", "B-PER", "I-PER"
  qa  {"id": str, "question": str, "context": str,
       "answers": {"text": [str, ...], "answer_start": [int, ...]}}
      answer_start is a character offset into context; empty lists = unanswerable (SQuAD v2)
  ir  {"query": str, "document": str, "grade": number (optional, default 1)}
      one line per judged (query, document) pair; lines with the same query text are one query.
      grade > 0 is relevant (higher = more relevant), 0 a judged non-relevant document.
"""

import hashlib
import json
import os

import files
from docstrings import demo_task
from tasks import FAMILIES, field

def read_jsonl(path: str) -> list[tuple[str, dict]]:
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    rows = []
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is reported with its number
        for n, line in enumerate(f, start=1):
            if line.strip():
                rows.append((f"{path}, line {n}", files.parse_json_line(path, n, line)))
    return rows


# --task name: (family, Hugging Face dataset, config,
# training split, test split = the official validation split)
HF_TASKS = {
    "sst2": ("sc", "nyu-mll/glue", "sst2", "train", "validation"),
    "mnli": ("sc", "nyu-mll/glue", "mnli", "train", "validation_matched"),
    "qqp": ("sc", "nyu-mll/glue", "qqp", "train", "validation"),
    "conll2003": ("tc", "eriktks/conll2003", None, "train", "validation"),
    "squad": ("qa", "rajpurkar/squad", None, "train", "validation"),
    "squad_v2": ("qa", "rajpurkar/squad_v2", None, "train", "validation"),
    "msmarco": ("ir", "microsoft/ms_marco", "v1.1", "train", "validation"),
}
GLUE_TEXTS = {"sst2": ("sentence",), "mnli": ("premise", "hypothesis"),
              "qqp": ("question1", "question2")}


def convert_hf(task: str, record: dict, tag_names: list[str] | None = None) -> list[dict]:
    """One Hugging Face record of a paper dataset -> our records (a list: an MS MARCO query gives
    one per passage)."""
    family = HF_TASKS[task][0]
    if family == "sc":
        texts = GLUE_TEXTS[task]
        out = {"text": record[texts[0]], "label": record["label"]}
        return [out | {"text_pair": record[texts[1]]}] if len(texts) == 2 else [out]
    if family == "tc":  # integer tags; their names come from the dataset's features
        return [{"words": list(record["tokens"]),
                 "tags": [tag_names[t] for t in record["ner_tags"]]}]
    if family == "qa":
        answers = record["answers"]
        return [{"id": record["id"], "question": record["question"], "context": record["context"],
                 "answers": {"text": list(answers["text"]),
                             "answer_start": list(answers["answer_start"])}}]
    passages = record["passages"]
    if not any(passages["is_selected"]):
        # no relevant passage: nothing to learn from and no ideal ranking to score against
        return []
    return [{"query": record["query"], "document": text, "grade": int(selected)}
            for text, selected in zip(passages["passage_text"], passages["is_selected"])]


def load_hf_task(task: str) -> tuple[list, list]:
    try:
        import datasets  # optional: only the paper's datasets need it
    except ImportError:
        raise SystemExit(f"error: --task={task} needs the optional datasets package: "
                         f"pip install datasets") from None
    family, name, config, *splits = HF_TASKS[task]
    out = []
    for split in splits:
        ds = datasets.load_dataset(name, config, split=split)
        tag_names = ds.features["ner_tags"].feature.names if family == "tc" else None
        out.append([(f"{name}/{split}, record {i + 1}", rec) for i, r in enumerate(ds)
                    for rec in convert_hf(task, r, tag_names)])
    return out[0], out[1]


def load_task(cfg, data_dir: str = "") -> tuple[str, list, list, list]:
    """(family, train rows, test rows, extra ir documents); rows are (where, record)
    pairs. data_dir: the checkpoint's pretraining data, where the demo tasks find their
    held-out docstrings."""
    if cfg.task in FAMILIES:
        family, train, test = cfg.task, read_jsonl(cfg.train), read_jsonl(cfg.test)
    elif cfg.task in HF_TASKS:
        family, (train, test) = HF_TASKS[cfg.task][0], load_hf_task(cfg.task)
    else:
        family = cfg.task.removeprefix("demo_")
        train, test = ([(f"{cfg.task} {split}, record {i + 1}", r) for i, r in enumerate(records)]
                       for split, records in zip(("train", "test"), demo_task(family, data_dir)))
    for name, path, rows in (("training", cfg.train, train), ("test", cfg.test, test)):
        if not rows:
            raise ValueError(f"{path if cfg.task in FAMILIES else '--task=' + cfg.task}: "
                             f"the {name} split is empty")
    extra = [field(where, r, "text", str, "a non-empty string")
             for where, r in read_jsonl(cfg.corpus)] if cfg.corpus else []
    return family, train, test, extra


def hold_out(rows: list, family: str, fraction: float) -> tuple[list, list]:
    """(train, validation): the validation rows are those whose stable hash ranks in the lowest
    `fraction` - the same for every seed and learning rate. Retrieval holds out whole queries;
    identical records always stay together."""
    def key(r):
        return r["query"] if family == "ir" else json.dumps(r, sort_keys=True)
    keys = sorted({key(r) for _, r in rows}, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
    if len(keys) < 2:
        raise ValueError(f"{rows[0][0]}: too few training examples to hold out a validation split")
    val = set(keys[:max(1, round(fraction * len(keys)))])
    return ([row for row in rows if key(row[1]) not in val],
            [row for row in rows if key(row[1]) in val])
