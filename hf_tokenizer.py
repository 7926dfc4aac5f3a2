"""
Hugging Face tokenizers in and out: a checkpoint's own byte-level BPE (tokenizer.json of the GPT-2 /
Llama 3 / SmolLM kind, or a tiktoken-format tokenizer.model) read into a tiktoken Encoding, so that
its weights keep their meaning; and any of our Encodings written back as a tokenizer.json that
transformers loads. data.get_tokenizer("hf:DIR") comes here.
"""

import base64
import functools
import hashlib
import json
import os
import re

import tiktoken

from data import Tokenizer

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-2's pattern after a Digits(individual_digits=True) pre-tokenizer (SmolLM): every digit stands
# alone, and a whitespace run before a digit ends where its piece ends, as it would at the end of
# the text.
GPT2_DIGITS_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"""
                       r"""|\s+(?![^\s\p{N}])|\s+""")
# A tiktoken-format file (Llama 3's original/tokenizer.model) holds ranks only; its pattern is
# Llama 3's.
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                  r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 bytes to printable characters, in which byte-level BPE files spell
    their tokens: printable Latin-1 bytes stand for themselves, the others for chr(256 + n) in byte
    order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b], n = chr(256 + n), n + 1
    return chars


def _pretokenizer_pattern(pre: dict | None, path: str) -> str:
    """The single regex tiktoken needs, from the pre-tokenizer forms byte-level BPEs use."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" \
        else [pre] if pre else []
    kinds = [step.get("type") for step in steps]
    if any(step.get("type") == "ByteLevel" and step.get("add_prefix_space") for step in steps):
        raise ValueError(f"{path}: ByteLevel add_prefix_space=true is not supported "
                         "(tiktoken adds no space)")
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) \
            and not steps[0].get("invert") and steps[0].get("behavior") == "Isolated" \
            and "Regex" in steps[0].get("pattern", {}):
        return steps[0]["pattern"]["Regex"]  # Llama 3 style
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PATTERN  # GPT-2 style
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") \
            and steps[1].get("use_regex", True):
        return GPT2_DIGITS_PATTERN  # SmolLM style
    raise ValueError(f"{path}: pre-tokenizer {kinds} is not one tiktoken can reproduce; supported: "
                     "[Split(Isolated regex), ByteLevel(use_regex=false)], [ByteLevel], "
                     "[Digits, ByteLevel]")


def _read_tokenizer_json(path: str):
    """tokenizer.json -> (mergeable ranks, special tokens, pattern). tiktoken's ranks are its token
    ids and it merges the adjacent pair whose concatenation has the lowest rank; the BPE of
    tokenizer.json applies its merges in list order. The two agree when each merge makes a token
    whose id grows with the merge's position (GPT-2, Llama 3 and the tokenizers library's trainer
    all number them so), which is checked."""
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") \
            or spec.get("normalizer") is not None:
        raise ValueError(f"{path}: not a byte-level BPE (model {model.get('type')}, byte_fallback "
                         f"{model.get('byte_fallback')}, normalizer {spec.get('normalizer')}); "
                         "SentencePiece-style tokenizers (Llama 2, Mistral) cannot be expressed as "
                         "a tiktoken Encoding")
    pattern = _pretokenizer_pattern(spec.get("pre_tokenizer"), path)
    vocab = model["vocab"]
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    special_ids = set(specials.values())
    try:  # a special token that is also in vocab (SmolLM's <|endoftext|>) is a special only:
          # never a BPE merge
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
        merged = vocab.get(a + b)
        if merged is None or merged <= last:
            raise ValueError(f"{path}: merge {i} ({a!r} + {b!r}) gives id {merged}, not above the "
                             f"previous merge's {last}: the ids do not follow the merge order, "
                             "which tiktoken needs")
        last = merged
    return ranks, specials, pattern


def _read_tiktoken_file(path: str, config: dict):
    """A tiktoken-format file (one 'base64-token rank' per line) + the special tokens of
    tokenizer_config.json."""
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}, line {lineno}: not a tiktoken-format file "
                                 "(a SentencePiece model? Llama 2 and Mistral tokenizers are "
                                 "not byte-level BPE and are not supported)") from None
    specials = {t["content"]: int(i) for i, t in config.get("added_tokens_decoder", {}).items()}
    return ranks, specials, LLAMA3_PATTERN


def _token_name(value) -> str | None:
    # tokenizer_config.json writes both forms
    return value.get("content") if isinstance(value, dict) else value


@functools.lru_cache(maxsize=None)
def hf_tokenizer(name: str) -> Tokenizer:
    """'hf:PATH': the tokenizer of a Hugging Face checkpoint directory, from tokenizer.json (or a
    tiktoken-format tokenizer.model) and tokenizer_config.json. End-of-text is the checkpoint's eos
    token. A checkpoint without a mask token gets '<|mask|>', and one without a pad distinct from
    eos and mask gets '<|pad|>', as new ids after its vocabulary (objectives.py ignores pad targets,
    so a pad shared with eos would hide every document end)."""
    path = name.removeprefix("hf:")
    config_path = os.path.join(path, "tokenizer_config.json")
    config = {}
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        ranks, specials, pattern = _read_tokenizer_json(os.path.join(path, "tokenizer.json"))
    elif os.path.exists(os.path.join(path, "tokenizer.model")):
        ranks, specials, pattern = _read_tiktoken_file(
            os.path.join(path, "tokenizer.model"), config)
    else:
        raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model: give the "
                                "checkpoint directory that holds its tokenizer files")
    eot = _token_name(config.get("eos_token"))
    eot = eot if eot in specials else next((t for t in ("<|end_of_text|>", "<|endoftext|>", "</s>")
                                            if t in specials), None)
    if eot is None:
        raise ValueError(f"{path}: no end-of-text token (eos_token in tokenizer_config.json, or "
                         "one of <|end_of_text|>, <|endoftext|>, </s> among the added tokens)")
    mask = _token_name(config.get("mask_token"))
    mask = mask if mask in specials else next((t for t in ("<|mask|>", "<mask>", "[MASK]")
                                               if t in specials), None)
    pad = _token_name(config.get("pad_token"))
    pad = pad if pad in specials else next((t for t in ("<|pad|>", "<pad>", "[PAD]")
                                            if t in specials), None)
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


# A tiktoken Encoding written back as a tokenizers-library tokenizer.json (for hf_export.py)


def _bpe_parts(ranks: dict, token: bytes) -> list[bytes]:
    """BPE of a token's own bytes using only the ranks below it: the two pieces whose merge made
    it."""
    limit, parts = ranks[token], [bytes([b]) for b in token]
    while True:
        pairs = [(ranks.get(a + b, limit), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank >= limit:
            return parts
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def post_processor(tok: Tokenizer, single: str = "$A", pair: str = "$A <eot> $B") -> dict:
    """What tokenizer(text) and tokenizer(a, b) add around the texts: templates of "$A", "$B" and
    "<eot>" (end-of-text), e.g. "$A <eot>" for the authors' fine-tuning inputs. The default adds
    nothing to a single text, as in pretraining (no BOS, no CLS), and joins a pair with
    end-of-text, the one boundary pretraining knows (tasks.py, --input_format=eot)."""
    eot = tok.encoding.decode_single_token_bytes(tok.eot_id).decode()

    def pieces(template):
        return [{"SpecialToken": {"id": eot, "type_id": 0}} if word == "<eot>"
                else {"Sequence": {"id": word.removeprefix("$"), "type_id": 0}}
                for word in template.split()]
    return {"type": "TemplateProcessing", "single": pieces(single), "pair": pieces(pair),
            "special_tokens": {eot: {"id": eot, "ids": [tok.eot_id], "tokens": [eot]}}}


def tokenizer_json(tok: Tokenizer, templates: tuple[str, str] = ("$A", "$A <eot> $B")) -> dict:
    """The tiktoken Encoding as a tokenizers-library byte-level BPE: the same pattern, ids and
    merges; templates: (single, pair) for post_processor. The mask token strips the spaces on its
    left (lstrip, RoBERTa's way): a masked token carries its own leading space in pretraining, so
    "is <|mask|>." must give 'is', '<|mask|>', '.' and not a stray ' ' token before the mask."""
    ranks, chars = tok.encoding._mergeable_ranks, bytes_to_unicode()
    # The tokenizers library reads patterns with Oniguruma's Ruby syntax, where `X{1,3}+` is not
    # possessive (as in tiktoken) but `(X{1,3})+`, any number of digits. A bounded repeat that ends
    # its branch never backtracks anyway, so plain `X{1,3}` means the same as tiktoken's possessive
    # one.
    pattern = re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", tok.encoding._pat_str)
    spell = lambda token: "".join(chars[b] for b in token)  # noqa: E731
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        parts = _bpe_parts(ranks, token) if len(token) > 1 else [token]
        # a token BPE cannot build from two lower ones is only reachable as a whole piece
        if len(parts) == 2:
            merges.append(" ".join(map(spell, parts)))
    return {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "post_processor": post_processor(tok, *templates),
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": i == tok.mask_id,
                          "rstrip": False, "normalized": False, "special": True}
                         for s, i in tok.encoding._special_tokens.items()],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False}]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        # ignore_merges: a piece that is a whole token is that token, as in tiktoken
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
                  "byte_fallback": False, "ignore_merges": True,
                  "merges": merges, "vocab": {spell(t): r for t, r in ranks.items()}
                  # tokenizers keeps an added token's id only if the model's vocab has it; else it
                  # renumbers it
                  | {spell(s.encode()): i for s, i in tok.encoding._special_tokens.items()}},
    }
