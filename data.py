"""The paper's data: documents, each followed by an end-of-text token, concatenated and cut into
fixed blocks every model reads in the same order. Prepared by `python data.py`; docs/data.md."""

import glob
import hashlib
import itertools
import json
import os
import platform
import re
import sys
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from mlm_vs_clm import files
from mlm_vs_clm.docstrings import HELDOUT_FILE, stable_fraction
from mlm_vs_clm.settings import at_least, command, configure, optional
from mlm_vs_clm.tokenizer import Tokenizer, get_tokenizer, tokenizer_problem

@dataclass
class PrepareConfig:
    source: str = "docstrings"  # docstrings (offline), fineweb-edu[:config], or .txt/.jsonl paths
    tokenizer: str = "cl100k_8k"  # cl100k, cl100k_<N>k or hf:DIR (a Hugging Face checkpoint's)
    out_dir: str = ""  # where the token files go; "" = data/<source>_<tokenizer>
    max_tokens: int = 0  # stop before the first document past this many tokens; 0 = all
    val_fraction: float = 0.05  # share of documents held out for validation (not docstrings)
    text_field: str = "text"  # .jsonl sources: the field holding the text
    seed: int = 0  # decides which documents go to validation

    def checks(self):
        return [*at_least(self, 0, "max_tokens", "seed"),
                (tokenizer_problem(self.tokenizer) is None, tokenizer_problem(self.tokenizer)),
                (0 < self.val_fraction < 1, "--val_fraction must be in (0, 1)")]

FORMAT_VERSION = 1
SPLITS = ("train", "val")

# Other sources: local .txt/.jsonl files and FineWeb-Edu

def _local_texts(source: str, text_field: str):
    """The documents of the files source (a path, directory or glob) matches, read lazily."""
    if os.path.isdir(source):
        paths = sorted(p for p in glob.glob(os.path.join(source, "**", "*"), recursive=True)
                       if p.endswith((".txt", ".jsonl")))
    else:
        paths = sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p))
    if not paths:
        raise ValueError(f"unknown source {source!r}: use 'docstrings', 'fineweb-edu[:<config>]', "
                         "or a path, directory or glob of .txt/.jsonl files (nothing matched)")
    for path in paths:  # checked up front so a typo fails before minutes of tokenizing
        if not path.endswith((".txt", ".jsonl")):
            raise ValueError(f"{path}: unsupported file type; use .txt (one document per file) "
                             "or .jsonl (one JSON object per line)")
    return _read_files(paths, text_field)

def _read_files(paths, text_field):
    for path in paths:
        if path.endswith(".txt"):
            yield _read_text(path)
            continue
        for lineno, obj in files.jsonl_records(path):
            if not isinstance(obj.get(text_field), str):
                raise ValueError(f"{path}, line {lineno}: no string field {text_field!r} (found "
                                 f"{list(obj)}); set --text_field to the field holding the text")
            yield obj[text_field]

def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}): "
                         "convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8") from None

def _fineweb_texts(config: str, text_field: str):
    datasets = optional("datasets", "source 'fineweb-edu'")
    rows = datasets.load_dataset("HuggingFaceFW/fineweb-edu", name=config, split="train",
                                 streaming=True)
    return (row[text_field] for row in rows)  # the only part that needs the network

# prepare: documents -> train.bin / val.bin / meta.json (and heldout.jsonl for the docstrings)

def _write_token_files(labelled_texts, tok: Tokenizer, out_dir: str, max_tokens: int | None,
                       batch_docs: int = 1024) -> dict:
    """Writes (split, text) pairs to out_dir/{split}.bin.tmp, whole documents up to max_tokens."""
    dtype = np.uint16 if tok.n_vocab <= 2**16 else np.uint32
    n_tokens, n_docs = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    digest = hashlib.sha256()
    labelled_texts = iter(labelled_texts)  # islice below must resume, not restart
    with ExitStack() as stack, tqdm(total=max_tokens, unit="tok", unit_scale=True,
                                    desc="tokenizing", disable=not sys.stderr.isatty()) as bar:
        outs = {s: stack.enter_context(open(os.path.join(out_dir, f"{s}.bin.tmp"), "wb"))
                for s in SPLITS}
        while batch := list(itertools.islice(labelled_texts, batch_docs)):
            splits, texts = zip(*batch)
            for split, ids in zip(splits, tok.encode_batch(list(texts))):
                ids.append(tok.eot_id)
                if max_tokens is not None and sum(n_tokens.values()) + len(ids) > max_tokens:
                    return token_meta(dtype, n_tokens, n_docs, digest)
                data = np.array(ids, dtype=dtype).tobytes()
                outs[split].write(data)
                digest.update(split.encode() + data)
                n_tokens[split] += len(ids)
                n_docs[split] += 1
                bar.update(len(ids))
    return token_meta(dtype, n_tokens, n_docs, digest)

def token_meta(dtype, n_tokens: dict, n_docs: dict, digest) -> dict:
    return {"dtype": np.dtype(dtype).name, "n_tokens": n_tokens, "n_documents": n_docs,
            "tokens_sha256": digest.hexdigest()}

def _commit(out_dir: str, meta: dict):
    """Moves the .tmp files in place: old meta.json out first, new one last; a crash leaves none."""
    meta_path, heldout = os.path.join(out_dir, "meta.json"), os.path.join(out_dir, HELDOUT_FILE)
    for old in (meta_path, heldout):  # both describe the old data
        if os.path.exists(old):
            os.remove(old)
    names = ([f"{split}.bin" for split in SPLITS]
             + ([HELDOUT_FILE] if os.path.exists(heldout + ".tmp") else []))
    for name in names:
        os.replace(os.path.join(out_dir, f"{name}.tmp"), os.path.join(out_dir, name))
    files.write_json(meta_path, meta)

def write_tokens(out_dir: str, tokens: dict, tokenizer_meta: dict, source: str) -> dict:
    """{"train": array, "val": array} of tokens -> the files prepare writes: synthetic data."""
    dtype = np.uint16 if tokenizer_meta["n_vocab"] <= 2**16 else np.uint32
    os.makedirs(out_dir, exist_ok=True)
    digest = hashlib.sha256()
    for split in SPLITS:
        data = np.asarray(tokens[split], dtype=dtype)
        data.tofile(os.path.join(out_dir, f"{split}.bin.tmp"))
        digest.update(split.encode() + data.tobytes())
    meta = {**tokenizer_meta, "source": source, "format_version": FORMAT_VERSION, **token_meta(
        dtype, {s: len(tokens[s]) for s in SPLITS}, dict.fromkeys(SPLITS, 0), digest)}
    _commit(out_dir, meta)
    return meta

def prepare(source: str, out_dir: str, tokenizer: str = "cl100k_8k", *,
            max_tokens: int | None = None, val_fraction: float = 0.05, text_field: str = "text",
            seed: int = 0, reuse: bool = False) -> dict:
    """A corpus -> out_dir/{train,val}.bin, meta.json (+heldout.jsonl); val by hash(seed, text)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if reuse and os.path.exists(os.path.join(out_dir, "meta.json")):
        return load_meta(out_dir)  # prepared: nothing to write, so read-only storage will do
    with files.exclusive(out_dir, f"preparing {out_dir}", wait=True):
        if reuse and os.path.exists(os.path.join(out_dir, "meta.json")):
            return load_meta(out_dir)
        print(f"preparing {source} with {tokenizer} into {out_dir}")
        try:
            meta = _prepare(source, out_dir, tokenizer, max_tokens, val_fraction, text_field, seed)
        finally:  # a failure (bad file, full disk) leaves the previous data and no partial files
            for name in (*(f"{split}.bin" for split in SPLITS), HELDOUT_FILE, "meta.json"):
                if os.path.exists(tmp := os.path.join(out_dir, name + ".tmp")):
                    os.remove(tmp)
    print(f"{out_dir}: {source} / {tokenizer}: train {meta['n_tokens']['train']:,} tokens "
          f"({meta['n_documents']['train']:,} docs), val {meta['n_tokens']['val']:,} tokens "
          f"({meta['n_documents']['val']:,} docs), {meta['dtype']}")
    return meta

def _prepare(source, out_dir, tokenizer, max_tokens, val_fraction, text_field, seed) -> dict:
    tok = get_tokenizer(tokenizer)
    if source == "docstrings":
        from mlm_vs_clm import docstrings  # parses the sources: imported only when needed
        labelled = docstrings.pretraining_texts(os.path.join(out_dir, f"{HELDOUT_FILE}.tmp"))
    else:
        fineweb = source == "fineweb-edu" or source.startswith("fineweb-edu:")
        if fineweb and max_tokens is None:
            raise ValueError("source 'fineweb-edu' is ~10B+ tokens: set --max_tokens, e.g. 1e9")
        texts = (_fineweb_texts(source.partition(":")[2] or "sample-10BT", text_field) if fineweb
                 else _local_texts(source, text_field))
        labelled = (("val" if stable_fraction(f"{seed}:{t}") < val_fraction else "train", t)
                    for t in texts if t.strip())
    written = _write_token_files(labelled, tok, out_dir, max_tokens)
    for split in SPLITS:
        if written["n_documents"][split] == 0:
            raise ValueError(f"the {split} split of {source!r} is empty ({written['n_documents']} "
                             "documents): add documents, raise max_tokens or change val_fraction")
    meta = {**tok.meta(), **written, "source": source, "format_version": FORMAT_VERSION}
    if source == "docstrings":  # the corpus is what the installed Python, numpy and torch hold
        meta["versions"] = {"python": platform.python_version(), "numpy": np.__version__,
                            "torch": torch.__version__}
    _commit(out_dir, meta)
    return meta

def default_data_dir(source: str, tokenizer: str) -> str:
    return os.path.join("data", re.sub(r"\W+", "_", f"{source}_{tokenizer}").strip("_"))

def data_dir_of(config: dict) -> str:
    """Where the token files of a run are, from its train_config dict."""
    return config.get("data_dir") or default_data_dir(config.get("data", ""),
                                                      config.get("tokenizer", ""))

def load_meta(data_dir: str) -> dict:
    """data_dir/meta.json, once its fields and the token files it describes are checked."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path} not found: prepare it first, e.g. `python data.py "
                                f"--source=docstrings --out_dir={data_dir}` (or data.prepare)")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e}): prepare the data again") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(f"{meta_path} has format_version {version}, this code reads "
                         f"{FORMAT_VERSION}: prepare the data again")
    if problem := _meta_problem(meta):
        raise ValueError(f"{meta_path}: {problem}: prepare the data again")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found although {meta_path} exists: re-run prepare")
        n, actual = meta["n_tokens"][split], os.path.getsize(path)
        if actual != n * itemsize:
            raise ValueError(f"{path} has {actual:,} bytes but meta.json expects {n * itemsize:,} "
                             f"({n:,} tokens x {itemsize}): truncated or stale, re-run prepare")
    return meta

def _meta_problem(meta: dict) -> str | None:
    def count(value):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if not count(meta.get("n_vocab")) or meta["n_vocab"] < 1:
        return f"field 'n_vocab' must be a positive integer, got {meta.get('n_vocab')!r}"
    for key in ("eot_id", "mask_id", "pad_id"):
        if not count(meta.get(key)) or meta[key] >= meta["n_vocab"]:
            return (f"field {key!r} must be a token id below n_vocab={meta['n_vocab']}, "
                    f"got {meta.get(key)!r}")
    if meta.get("dtype") not in ("uint16", "uint32"):
        return f"field 'dtype' must be 'uint16' or 'uint32', got {meta.get('dtype')!r}"
    if np.iinfo(meta["dtype"]).max < meta["n_vocab"] - 1:
        return f"dtype {meta['dtype']} cannot hold the ids of a {meta['n_vocab']}-token vocabulary"
    counts = meta.get("n_tokens")
    if not isinstance(counts, dict) or not all(count(counts.get(split)) for split in SPLITS):
        return f"field 'n_tokens' must give a token count for each of {SPLITS}, got {counts!r}"
    if not isinstance(meta.get("tokenizer"), str):
        return f"field 'tokenizer' must be a tokenizer name, got {meta.get('tokenizer')!r}"
    return None

# BlockLoader: fixed blocks in an order that only (seed, epoch) decides

class BlockLoader:
    """(batch_size, block_size) int64 batches of disjoint blocks of one split, epoch e in the order
    np.random.default_rng([seed, e]).permutation(n_blocks). `position` counts blocks all ranks took
    (each its slice), so the order is fixed for any batch/world size: 8 == 2 ranks x 4 == 2 x 4."""

    def __init__(self, data_dir, split, block_size, batch_size, *, seed=0, rank=0, world_size=1,
                 device="cpu"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        meta = load_meta(data_dir)
        self.path = os.path.join(data_dir, f"{split}.bin")
        self.dtype, self.n_vocab, self.split = np.dtype(meta["dtype"]), meta["n_vocab"], split
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.block_size, self.batch_size, self.device = block_size, batch_size, torch.device(device)
        n_tokens = meta["n_tokens"][split]
        self.n_blocks = n_tokens // block_size  # the tail remainder is dropped
        if self.n_blocks < 1:
            raise ValueError(f"{self.path} has {n_tokens:,} tokens, fewer than one block of "
                             f"{block_size}: use a smaller block_size or prepare more data")
        if self.n_blocks < world_size * batch_size:
            raise ValueError(f"{self.path} has {self.n_blocks:,} blocks of {block_size} tokens, "
                             f"fewer than one global batch of {world_size * batch_size} "
                             f"(world_size {world_size} x batch_size {batch_size}): use a smaller "
                             "batch_size or block_size, or prepare more data")
        self.position = 0
        self._orders = {}  # epoch -> permutation; a batch spans at most two epochs

    @property
    def epoch(self) -> int:
        return self.position // self.n_blocks

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = (np.random.default_rng([self.seed, epoch])
                                   .permutation(self.n_blocks))
        return self._orders[epoch]

    def next_batch(self) -> torch.Tensor:
        first = self.position + self.rank * self.batch_size
        epochs, offsets = np.divmod(np.arange(first, first + self.batch_size), self.n_blocks)
        blocks = np.array([self._order(e)[o] for e, o in zip(epochs.tolist(), offsets.tolist())])
        self.position += self.world_size * self.batch_size
        # a fresh memmap per batch, as nanoGPT: a long-lived one keeps every page it touched mapped
        data = np.memmap(self.path, dtype=self.dtype, mode="r")
        T = self.block_size
        x = np.stack([data[b * T:(b + 1) * T] for b in blocks]).astype(np.int64)  # (B, T)
        if x.max() >= self.n_vocab:  # checked on the host, where it is free: no silent wrong row
            raise ValueError(f"{self.path} holds token id {x.max()} but its tokenizer has "
                             f"{self.n_vocab} ids: corrupt, or another tokenizer's; re-run prepare")
        x = torch.from_numpy(x)
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "split": self.split,
                "block_size": self.block_size, "n_blocks": self.n_blocks}

    def load_state_dict(self, state: dict) -> None:
        # position counts global blocks: world_size/batch_size may change, not what fixes the order
        for key in ("seed", "split", "block_size", "n_blocks"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume this loader: saved {key}={state[key]!r}, "
                                 f"this loader has {getattr(self, key)!r}")
        self.position = state["position"]

@command
def main(argv: list[str]):
    cfg = configure(PrepareConfig, argv)
    prepare(cfg.source, cfg.out_dir or default_data_dir(cfg.source, cfg.tokenizer), cfg.tokenizer,
            max_tokens=cfg.max_tokens or None, val_fraction=cfg.val_fraction,
            text_field=cfg.text_field, seed=cfg.seed)

if __name__ == "__main__":
    main(sys.argv[1:])
