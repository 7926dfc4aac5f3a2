"""
Data: the tokenizers, the docstring corpus, prepare on local files and FineWeb-Edu, meta.json
checks, the block loader and the data.py command (data.py, docstrings.py).
"""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import data
from mlm_vs_clm import docstrings
from tests.helpers import HERE, write_jsonl
from data import BlockLoader, load_meta, prepare
from mlm_vs_clm.tokenizer import SPECIAL_TOKENS, check_tokenizer, get_tokenizer
from mlm_vs_clm.docstrings import Document, docstring_documents, split_of

UNICODE_TEXT = ("Héllo wörld — naïve café, 東京 and emoji 🤖🚀; "
                "tabs\tand\nnewlines  x² ∑ 𝔘")

# --------------------------------------------------------------------------------------------------
# Tokenizers

@pytest.mark.parametrize("name, n_ordinary",
                         [("cl100k", 100256), ("cl100k_8k", 8192), ("cl100k_16k", 16384)])
def test_tokenizer_specials_and_round_trip(name, n_ordinary):
    tok = get_tokenizer(name)
    assert tok.name == name
    assert tok.n_vocab == n_ordinary + 3
    assert (tok.eot_id, tok.mask_id, tok.pad_id) == (n_ordinary, n_ordinary + 1, n_ordinary + 2)
    assert tok.special_ids == (tok.eot_id, tok.mask_id, tok.pad_id)
    assert tok.meta() == {"tokenizer": name, "n_vocab": n_ordinary + 3, "eot_id": n_ordinary,
                          "mask_id": n_ordinary + 1, "pad_id": n_ordinary + 2}
    text = "def f(x):\n    return x ** 2  # The quick brown fox. " + UNICODE_TEXT
    ids = tok.encode(text)
    assert all(0 <= i < n_ordinary for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text and tok.decode(np.array(ids)) == text
    assert tok.encode_batch([text, "", "abc"]) == [ids, [], tok.encode("abc")]
    assert tok.decode([tok.eot_id, tok.mask_id, tok.pad_id]) == "".join(SPECIAL_TOKENS)

def test_special_strings_in_text_are_ordinary_text():
    tok = get_tokenizer("cl100k_8k")
    text = "a <|endoftext|> b <|mask|> c <|pad|>"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_ids)
    assert tok.decode(ids) == text
    assert not set(tok.encode_batch([text])[0]) & set(tok.special_ids)

def test_truncated_tokenizer_is_a_prefix_of_cl100k():
    full, small = get_tokenizer("cl100k"), get_tokenizer("cl100k_8k")
    text = "Compute the singular value decomposition of a matrix. " * 3
    # common words keep their low-rank cl100k ids; rarer ones split into more, smaller pieces
    assert full.encode("the") == small.encode("the")
    assert len(small.encode(UNICODE_TEXT)) >= len(full.encode(UNICODE_TEXT))
    assert max(small.encode(text + UNICODE_TEXT)) < 8192
    assert get_tokenizer("cl100k_8k") is small  # cached

@pytest.mark.parametrize("name", ["gpt2", "cl100k_base", "cl100k_0k", "cl100k_98k", "cl100k_8"])
def test_unknown_tokenizer(name):
    with pytest.raises(ValueError, match="cl100k"):
        get_tokenizer(name)

# --------------------------------------------------------------------------------------------------
# The docstring corpus (docstrings.py)

def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)

LONG = "This sentence is long enough to count as a real piece of English prose for the corpus."

def _fake_tree(root):
    _write(root / "stdlib" / "alpha.py", f'"""{LONG} (alpha module)"""\n'
           f'class A:\n    """{LONG} (A)"""\n    def m(self):\n        """{LONG} (A.m)"""\n'
           f'    def short(self):\n        """Too short."""\n'
           f'if True:\n    def g():\n        """{LONG} (g)"""\n'
           f'        def inner():\n            """{LONG} (inner)"""\n'
           f'async def h():\n    """{LONG} (A)"""\n')  # duplicate text of A: dropped
    _write(root / "stdlib" / "pkg" / "__init__.py", f'"""{LONG} (pkg)"""\n')
    _write(root / "stdlib" / "pkg" / "tests" / "test_x.py", f'"""{LONG} (test)"""\n')
    _write(root / "stdlib" / "site-packages" / "other" / "__init__.py", f'"""{LONG} (site)"""\n')
    _write(root / "stdlib" / "broken.py", 'print "python 2"\n')
    _write(root / "sp" / "numpy" / "__init__.py", f'"""{LONG} (numpy)"""\n')
    _write(root / "sp" / "numpy" / "linalg" / "_linalg.py",
           f'def svd(a):\n    """{LONG} (svd)"""\n')
    _write(root / "sp" / "numpy" / "testing" / "utils.py", f'"""{LONG} (testing)"""\n')
    _write(root / "sp" / "torch" / "nn.py",
           f'class Linear:\n    def forward(self):\n        """{LONG} (fwd)"""\n')

def test_docstring_extraction_on_fake_packages(tmp_path, monkeypatch):
    _fake_tree(tmp_path)
    monkeypatch.setattr(docstrings.sysconfig, "get_paths",
                        lambda: {"stdlib": str(tmp_path / "stdlib")})
    monkeypatch.setattr(docstrings.importlib.util, "find_spec",
                        lambda name: types.SimpleNamespace(
                            submodule_search_locations=[str(tmp_path / "sp" / name)]))
    docs = docstring_documents()
    got = [(d.source, d.module, d.name, d.text.removeprefix(LONG + " ")) for d in docs]
    assert got == [
        ("stdlib", "alpha", "", "(alpha module)"),
        ("stdlib", "alpha", "A", "(A)"),
        ("stdlib", "alpha", "A.m", "(A.m)"),
        ("stdlib", "alpha", "g", "(g)"),
        ("stdlib", "alpha", "g.inner", "(inner)"),
        ("stdlib", "pkg", "", "(pkg)"),
        ("numpy", "numpy", "", "(numpy)"),
        ("numpy", "numpy.linalg._linalg", "svd", "(svd)"),
        ("torch", "torch.nn", "Linear.forward", "(fwd)"),
    ]
    assert docstring_documents() == docs

def test_split_of_is_stable_and_roughly_85_5_10():
    docs = [Document("stdlib", f"mod{i // 10}", f"f{i}", "text") for i in range(20000)]
    splits = [split_of(d) for d in docs]
    assert splits == [split_of(Document("other", d.module, d.name, "other text"))
                      for d in docs]  # key is module:name
    frac = {s: splits.count(s) / len(splits) for s in ("train", "val", "heldout")}
    assert abs(frac["train"] - 0.85) < 0.015 and abs(frac["val"] - 0.05) < 0.01 and \
        abs(frac["heldout"] - 0.10) < 0.01
    # pinned values: the heldout set must never move between versions or machines
    keys = [("json.decoder", "JSONDecoder.decode"), ("json.decoder", "scandir"),
            ("os", "namedtuple")]
    assert [split_of(Document("stdlib", m, n, "")) for m, n in keys] == ["train", "val", "heldout"]

@pytest.fixture(scope="module")
def real_docs():
    return docstring_documents()  # the one real extraction of this file (~20-30 s)

@pytest.mark.slow
def test_real_docstring_corpus(real_docs):
    assert len(real_docs) > 10_000
    assert sum(len(d.text) for d in real_docs) > 1_000_000
    assert {d.source for d in real_docs} == {"stdlib", "numpy", "torch"}
    assert {split_of(d) for d in real_docs} == {"train", "val", "heldout"}
    assert len({d.text for d in real_docs}) == len(real_docs)
    assert all(len(d.text) >= 64 for d in real_docs)
    assert not any(".tests." in d.module or d.module.startswith("test.") for d in real_docs)
    json_doc = next(d for d in real_docs
                    if d.module == "json.decoder" and d.name == "JSONDecoder.decode")
    assert "Python representation" in json_doc.text
    # deterministic order: sources in stdlib, numpy, torch order, modules in sorted-walk order
    # within each
    sources = [d.source for d in real_docs]
    assert sources == sorted(sources, key=["stdlib", "numpy", "torch"].index)

@pytest.mark.slow
def test_prepare_docstrings_excludes_heldout(tmp_path, monkeypatch, real_docs):
    subset = real_docs[:400]
    monkeypatch.setattr(docstrings, "docstring_documents", lambda: subset)
    meta = prepare("docstrings", str(tmp_path), "cl100k_8k")
    tok = get_tokenizer("cl100k_8k")
    for split in ("train", "val"):
        stream = np.fromfile(tmp_path / f"{split}.bin", dtype=np.uint16)
        texts = tok.decode(stream).split("<|endoftext|>")[:-1]
        assert texts == [d.text for d in subset if split_of(d) == split]
        assert meta["n_documents"][split] == len(texts) and meta["n_tokens"][split] == len(stream)
    assert meta["source"] == "docstrings"
    # the held-out rest is saved beside the tokens, so fine-tuning reads it instead of parsing the
    # sources again
    heldout = [d for d in subset if split_of(d) == "heldout"]
    monkeypatch.setattr(docstrings, "docstring_documents", lambda: pytest.fail("parsed again"))
    assert heldout and list(docstrings.heldout_documents(str(tmp_path))) == heldout
    write_jsonl(tmp_path / "docs.jsonl", [{"text": f"document {i}"} for i in range(20)])
    prepare(str(tmp_path / "docs.jsonl"), str(tmp_path), "cl100k_8k", val_fraction=0.5)
    # re-prepared with other data: the old list is gone
    assert not (tmp_path / docstrings.HELDOUT_FILE).exists()

# --------------------------------------------------------------------------------------------------
# prepare on local files

def _decode_split(out_dir, split, tok, dtype):
    stream = np.fromfile(os.path.join(out_dir, f"{split}.bin"), dtype=dtype)
    assert stream[-1] == tok.eot_id
    return tok.decode(stream).split("<|endoftext|>")[:-1]

@pytest.mark.parametrize("tokenizer, dtype", [("cl100k_8k", "uint16"), ("cl100k", "uint32")])
def test_prepare_txt_round_trip(tmp_path, tokenizer, dtype):
    texts = [f"Document {i}: {UNICODE_TEXT} " + "word " * i for i in range(40)]
    for i, t in enumerate(texts):
        _write(tmp_path / "corpus" / f"{i:03d}.txt", t)
    out = tmp_path / "out"
    meta = prepare(str(tmp_path / "corpus" / "*.txt"), str(out), tokenizer, val_fraction=0.3)
    tok = get_tokenizer(tokenizer)
    assert meta == load_meta(str(out))
    assert meta["dtype"] == dtype and meta["format_version"] == 1
    assert {k: meta[k] for k in tok.meta()} == tok.meta()
    train, val = _decode_split(out, "train", tok, dtype), _decode_split(out, "val", tok, dtype)
    assert len(train) > 0 and len(val) > 0
    assert sorted(train + val) == sorted(texts)
    assert train == [t for t in texts if t in train]  # file order kept
    assert meta["n_documents"] == {"train": len(train), "val": len(val)}
    assert sorted(f for f in os.listdir(out) if f != ".lock") == \
        ["meta.json", "train.bin", "val.bin"]
    # a directory source and a re-run give identical files
    meta2 = prepare(str(tmp_path / "corpus"), str(tmp_path / "out2"), tokenizer, val_fraction=0.3)
    assert meta2["n_tokens"] == meta["n_tokens"]
    assert (out / "train.bin").read_bytes() == (tmp_path / "out2" / "train.bin").read_bytes()

def test_prepare_jsonl_text_field_seed_and_max_tokens(tmp_path):
    rows = [{"id": i, "content": f"Row number {i} says hello, ünïcödé 🚀."}
            for i in range(60)]
    _write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in rows[:30]) + "\n\n")
    _write(tmp_path / "b.jsonl", "\n".join(json.dumps(r) for r in rows[30:]))
    tok = get_tokenizer("cl100k_8k")
    meta = prepare(str(tmp_path / "*.jsonl"), str(tmp_path / "out"), text_field="content",
                   val_fraction=0.25)
    docs = [d for split in ("train", "val")
            for d in _decode_split(tmp_path / "out", split, tok, np.uint16)]
    assert sorted(docs) == sorted(r["content"] for r in rows)
    other = prepare(str(tmp_path / "*.jsonl"), str(tmp_path / "out_seed"), text_field="content",
                    val_fraction=0.25, seed=1)
    assert other["n_documents"] != meta["n_documents"] or \
        (tmp_path / "out" / "val.bin").read_bytes() != \
        (tmp_path / "out_seed" / "val.bin").read_bytes()
    n_doc = len(tok.encode(rows[0]["content"])) + 1
    small = prepare(str(tmp_path / "*.jsonl"), str(tmp_path / "small"), text_field="content",
                    val_fraction=0.5, max_tokens=20 * n_doc + 3)
    assert sum(small["n_tokens"].values()) <= 20 * n_doc + 3
    assert sum(small["n_documents"].values()) == 20  # whole documents only

@pytest.mark.parametrize("line, match", [('{"text": "ok"', "invalid JSON"),
                                         ('{"body": "no text"}', "'text'"),
                                         ('["text"]', "JSON object"), ('{"text": 3}', "'text'")])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    _write(path, '{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=match) as e:
        prepare(str(path), str(tmp_path / "out"))
    assert str(path) in str(e.value) and "line 3" in str(e.value)
    assert not (tmp_path / "out" / "meta.json").exists()

def test_unknown_source_and_unsupported_files(tmp_path):
    with pytest.raises(ValueError, match="docstrings.*fineweb-edu"):
        prepare("wikipedia", str(tmp_path / "out"))
    with pytest.raises(ValueError, match="docstrings.*fineweb-edu"):
        prepare(str(tmp_path / "nothing*.txt"), str(tmp_path / "out"))
    _write(tmp_path / "x.csv", "a,b\n")
    with pytest.raises(ValueError, match=r"x\.csv.*\.txt.*\.jsonl"):
        prepare(str(tmp_path / "x.*"), str(tmp_path / "out"))
    _write(tmp_path / "one.txt", "a single document cannot fill both splits")
    with pytest.raises(ValueError, match="split .* is empty"):
        prepare(str(tmp_path / "one.txt"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="val_fraction"):
        prepare(str(tmp_path / "one.txt"), str(tmp_path / "out"), val_fraction=0)

def test_fineweb_branch(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="max_tokens"):
        prepare("fineweb-edu", str(tmp_path / "out"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        prepare("fineweb-edu", str(tmp_path / "out"), max_tokens=1000)
    # everything but the network: a fake `datasets` that streams rows
    calls = []

    def load_dataset(path, name, split, streaming):
        calls.append((path, name, split, streaming))
        return iter([{"text": f"Educational page {i} about photosynthesis."}
                     for i in range(10_000)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    meta = prepare("fineweb-edu:sample-100BT", str(tmp_path / "out"), max_tokens=5000)
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-100BT", "train", True)]
    assert 4900 < sum(meta["n_tokens"].values()) <= 5000 and meta["n_documents"]["val"] > 0

# --------------------------------------------------------------------------------------------------
# meta checks

def test_load_meta_missing_and_truncated(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare"):
        load_meta(str(tmp_path))
    for i in range(20):
        _write(tmp_path / "c" / f"{i}.txt", f"document {i} " * 10)
    prepare(str(tmp_path / "c"), str(tmp_path / "d"), val_fraction=0.3)
    train = tmp_path / "d" / "train.bin"
    size = train.stat().st_size
    with open(train, "r+b") as f:
        f.truncate(size - 2)
    with pytest.raises(ValueError) as e:
        load_meta(str(tmp_path / "d"))
    assert str(train) in str(e.value) and f"{size - 2:,}" in str(e.value) and \
        f"{size:,}" in str(e.value)
    prepare(str(tmp_path / "c"), str(tmp_path / "d"), val_fraction=0.3)  # overwrites a prepared dir
    os.remove(tmp_path / "d" / "val.bin")
    with pytest.raises(FileNotFoundError, match="val.bin"):
        load_meta(str(tmp_path / "d"))

def test_check_tokenizer():
    meta = {**get_tokenizer("cl100k_8k").meta(), "dtype": "uint16"}
    check_tokenizer(meta, get_tokenizer("cl100k_8k").meta(), "the model", "the data")
    with pytest.raises(ValueError) as e:
        check_tokenizer(meta, get_tokenizer("cl100k_16k").meta(), "the model", "the data")
    assert all(w in str(e.value) for w in ("the data", "cl100k_8k", "the model", "cl100k_16k"))
    with pytest.raises(ValueError, match="mask_id 8193 against 5"):
        check_tokenizer(meta, {**meta, "mask_id": 5}, "the model", "the data")

# --------------------------------------------------------------------------------------------------
# BlockLoader, on a synthetic stream where token i == i, so a block's first token tells which
# block it is

N_TOKENS, T = 1005, 10  # 100 blocks, 5 tail tokens dropped

@pytest.fixture()
def stream_dir(tmp_path):
    meta = {**get_tokenizer("cl100k_8k").meta(), "dtype": "uint16", "source": "synthetic",
            "n_tokens": {"train": N_TOKENS, "val": 3 * T}, "n_documents": {"train": 1, "val": 1},
            "format_version": 1}
    np.arange(N_TOKENS, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(3 * T, dtype=np.uint16).tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return str(tmp_path)

def _blocks(x):
    assert x.dtype == torch.int64 and x.shape[1] == T
    # each row is a contiguous slice of the stream
    assert torch.equal(x - x[:, :1], torch.arange(T).expand_as(x))
    assert bool((x[:, 0] % T == 0).all())  # ... that starts on a block boundary
    return (x[:, 0] // T).tolist()

def test_loader_epochs_follow_seeded_permutations(stream_dir):
    loader = BlockLoader(stream_dir, "train", T, 8, seed=3)
    assert loader.n_blocks == 100
    seen = []
    for _ in range(25):  # 200 blocks: crosses the epoch boundary mid-batch (96 -> 104)
        x = loader.next_batch()
        assert x.shape == (8, T)
        seen += _blocks(x)
    expected = np.concatenate([np.random.default_rng([3, e]).permutation(100)
                               for e in range(2)]).tolist()
    assert seen == expected
    assert sorted(seen[:100]) == list(range(100)) and seen[:100] != seen[100:]
    assert loader.position == 200 and loader.epoch == 2

def test_loader_seed_determinism(stream_dir):
    a, b, c = (BlockLoader(stream_dir, "train", T, 4, seed=s) for s in (0, 0, 1))
    xs_a, xs_b, xs_c = ([loader.next_batch() for _ in range(5)] for loader in (a, b, c))
    assert all(torch.equal(x, y) for x, y in zip(xs_a, xs_b))
    assert not all(torch.equal(x, y) for x, y in zip(xs_a, xs_c))

def test_loader_order_independent_of_batch_and_world_size(stream_dir):
    big = BlockLoader(stream_dir, "train", T, 8, seed=7)
    r0, r1 = (BlockLoader(stream_dir, "train", T, 4, seed=7, rank=r, world_size=2) for r in (0, 1))
    small = BlockLoader(stream_dir, "train", T, 4, seed=7)
    for _ in range(15):  # past the epoch boundary
        x = big.next_batch()
        assert torch.equal(x, torch.cat([r0.next_batch(), r1.next_batch()]))
        assert torch.equal(x, torch.cat([small.next_batch(), small.next_batch()]))
    assert big.position == r0.position == r1.position == small.position == 120

def test_loader_resume(stream_dir):
    loader = BlockLoader(stream_dir, "train", T, 6, seed=1)
    for _ in range(10):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # survives a checkpoint round trip
    expected = [loader.next_batch() for _ in range(10)]
    resumed = BlockLoader(stream_dir, "train", T, 6, seed=1)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, resumed.next_batch()) for x in expected)
    # position is global: resuming on 2 ranks of batch 3 continues the same order
    r0, r1 = (BlockLoader(stream_dir, "train", T, 3, seed=1, rank=r, world_size=2) for r in (0, 1))
    r0.load_state_dict(state), r1.load_state_dict(state)
    assert torch.equal(expected[0], torch.cat([r0.next_batch(), r1.next_batch()]))
    with pytest.raises(ValueError, match="seed"):
        BlockLoader(stream_dir, "train", T, 6, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="block_size"):
        BlockLoader(stream_dir, "train", 5, 6, seed=1).load_state_dict(state)

def test_loader_val_split_and_errors(stream_dir):
    val = BlockLoader(stream_dir, "val", T, 3)
    assert sorted(_blocks(val.next_batch())) == [0, 1, 2]
    first, again = BlockLoader(stream_dir, "val", T, 3), BlockLoader(stream_dir, "val", T, 3)
    assert torch.equal(first.next_batch(), again.next_batch())
    with pytest.raises(ValueError, match="fewer than one block"):
        BlockLoader(stream_dir, "val", 31, 1)
    with pytest.raises(ValueError, match="global batch of 4 .world_size 2 x batch_size 2"):
        BlockLoader(stream_dir, "val", T, 2, world_size=2)
    with pytest.raises(ValueError, match="split"):
        BlockLoader(stream_dir, "test", T, 1)
    with pytest.raises(ValueError, match="rank"):
        BlockLoader(stream_dir, "train", T, 1, rank=2, world_size=2)

def test_loader_on_prepared_data_matches_stream(tmp_path):
    for i in range(30):
        _write(tmp_path / "c" / f"{i:02d}.txt",
               f"Document {i}. " + "All work and no play makes a dull model. " * 5)
    prepare(str(tmp_path / "c"), str(tmp_path / "d"), val_fraction=0.2)
    stream = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint16).astype(np.int64)
    loader = BlockLoader(str(tmp_path / "d"), "train", 16, 2, seed=0)
    order = np.random.default_rng([0, 0]).permutation(loader.n_blocks)
    assert loader.n_blocks == len(stream) // 16
    x = loader.next_batch()
    assert torch.equal(x, torch.from_numpy(np.stack([stream[b * 16:(b + 1) * 16]
                                                     for b in order[:2]])))

# --------------------------------------------------------------------------------------------------
# CLI

@pytest.mark.slow
def test_cli(tmp_path):
    for i in range(10):
        _write(tmp_path / "c" / f"{i}.txt", f"CLI document number {i}.")

    def run(*args):
        return subprocess.run([sys.executable, os.path.join(HERE, "data.py"), *args],
                              capture_output=True, text=True, cwd=tmp_path)

    bad = run("--sorce=docstrings")
    assert bad.returncode != 0 and "unknown setting 'sorce'" in bad.stderr and \
        "source" in bad.stderr
    ok = run(f"--source={tmp_path / 'c'}", "--tokenizer=cl100k_16k", "--val_fraction=0.5",
             "--max_tokens=1e3")
    assert ok.returncode == 0, ok.stderr
    meta = load_meta(str(tmp_path / data.default_data_dir(str(tmp_path / "c"), "cl100k_16k")))
    assert meta["tokenizer"] == "cl100k_16k" and sum(meta["n_documents"].values()) == 10

# --------------------------------------------------------------------------------------------------
# The loader's check of the token ids

def test_loader_rejects_ids_past_the_vocabulary(tmp_path):
    """On accelerators objectives.py skips its range check (a host sync); the loader's host-side
    check covers it."""
    meta = get_tokenizer("cl100k_8k").meta()
    data.write_tokens(str(tmp_path), {"train": np.full(64, meta["n_vocab"]), "val": np.zeros(64)},
                      meta, "synthetic")
    with pytest.raises(ValueError, match="holds token id 8195 but its tokenizer has 8195 ids"):
        BlockLoader(str(tmp_path), "train", 16, 2).next_batch()
