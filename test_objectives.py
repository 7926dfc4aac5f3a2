"""
The project's tests: CPU only, tiny models, data built on the spot, nothing downloaded.

    python -m pytest -q test_objectives.py
"""

import dataclasses
import importlib.util
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import textwrap
import types
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bench
import data
import files
import finetune as ft
import model
import model as M
import objectives as O
import train
from data import (
    BlockLoader,
    Document,
    check_tokenizer,
    docstring_documents,
    get_tokenizer,
    load_meta,
    prepare,
    split_of,
)
from model import checkpoint_payload

HERE = os.path.dirname(os.path.abspath(__file__))

VOCAB = O.Vocab(size=128, mask_id=126, special_ids=(125, 126, 127), pad_id=127)  # eot, mask, pad last, as data.py


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return M.Transformer(M.model_config("test", vocab_size=VOCAB.size, **overrides))


def random_tokens(shape, seed=0, specials_every=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB.size - len(VOCAB.special_ids), shape, generator=g)
    if specials_every:
        tokens[:, ::specials_every] = 125  # end-of-text between documents, as in packed blocks
        tokens[:, 1::specials_every] = 127
    return tokens


# ---------------------------------------------------------------------------------------------------------------
# MLM masking


@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.4, 0.5])
def test_mask_ratio_statistics(ratio):
    tokens = random_tokens((100, 1000), specials_every=10)  # 100k tokens, 20% special
    inputs, labels = O.mask_tokens(tokens, VOCAB, ratio, generator=torch.Generator().manual_seed(1))
    selected = labels != O.IGNORE
    maskable = ~torch.isin(tokens, torch.tensor(VOCAB.special_ids))
    frac = selected.sum().item() / maskable.sum().item()
    sd = math.sqrt(ratio * (1 - ratio) / maskable.sum().item())
    assert abs(frac - ratio) < 5 * sd  # within 5 standard deviations: ~0.008 at 80k tokens
    assert not (selected & ~maskable).any(), "a special token was selected"
    # labels are the original token exactly where selected, ignored everywhere else
    assert torch.equal(labels[selected], tokens[selected])
    assert (labels[~selected] == O.IGNORE).all()
    # the paper's rule: every selected token becomes <|mask|>, nothing else changes
    assert (inputs[selected] == VOCAB.mask_id).all()
    assert torch.equal(inputs[~selected], tokens[~selected])


def test_bert_replacement_split():
    tokens = random_tokens((200, 1000), specials_every=10)
    inputs, labels = O.mask_tokens(tokens, VOCAB, 0.5, "bert", generator=torch.Generator().manual_seed(2))
    selected = labels != O.IGNORE
    n = selected.sum().item()
    masked = (inputs == VOCAB.mask_id) & selected
    unchanged = (inputs == tokens) & selected
    other = selected & ~masked & ~unchanged
    # a random replacement can draw the original token (1 chance in 125), which then counts as unchanged
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    assert abs(unchanged.sum().item() / n - (0.1 + 0.1 / 125)) < 0.01
    assert abs(other.sum().item() / n - 0.1 * 124 / 125) < 0.01
    assert not torch.isin(inputs[other], torch.tensor(VOCAB.special_ids)).any(), "random token was special"
    assert torch.equal(inputs[~selected], tokens[~selected])


def test_masking_is_reproducible_from_a_seed():
    tokens = random_tokens((4, 64))
    a = O.mask_tokens(tokens, VOCAB, 0.4, "bert", generator=torch.Generator().manual_seed(3))
    b = O.mask_tokens(tokens, VOCAB, 0.4, "bert", generator=torch.Generator().manual_seed(3))
    c = O.mask_tokens(tokens, VOCAB, 0.4, "bert", generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


# ---------------------------------------------------------------------------------------------------------------
# Losses


def test_clm_loss_matches_reference():
    model, tokens = tiny_model(), random_tokens((3, 40), specials_every=16)
    loss, n = O.pretraining_loss(model, tokens, "clm", VOCAB)
    logits = model.logits(model(tokens[:, :-1], causal=True))
    targets = tokens[:, 1:].clone()
    targets[targets == VOCAB.pad_id] = -100
    ref = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
    assert torch.allclose(loss, ref, atol=1e-6)
    assert n.item() == (targets != -100).sum().item() == 3 * 39 - 3 * 3  # pads at positions 1, 17, 33


def test_sparse_mlm_loss_equals_dense():
    model, tokens = tiny_model(), random_tokens((3, 48), specials_every=12)
    loss, n = O.pretraining_loss(model, tokens, "mlm", VOCAB, generator=torch.Generator().manual_seed(5))
    inputs, labels = O.mask_tokens(tokens, VOCAB, 0.4, generator=torch.Generator().manual_seed(5))
    logits = model.logits(model(inputs, causal=False))  # every position through the head
    dense = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=O.IGNORE)
    assert torch.allclose(loss, dense, atol=1e-6)
    assert n.item() == (labels != O.IGNORE).sum().item() > 0
    # and the gradients agree too
    loss.backward()
    sparse_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    dense.backward()
    assert torch.allclose(sparse_grad, model.lm_head.weight.grad, atol=1e-6)


def test_mlm_uses_bidirectional_attention_and_clm_causal():
    calls = []
    model = tiny_model()
    model.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs["causal"]), with_kwargs=True)
    O.pretraining_loss(model, random_tokens((2, 16)), "clm", VOCAB)
    O.pretraining_loss(model, random_tokens((2, 16)), "mlm", VOCAB)
    assert calls == [True, False]


@pytest.mark.parametrize("bad, message", [
    (dict(objective="mlmm"), "objective"),
    (dict(mask_ratio=0.0), "mask_ratio"),
    (dict(mask_ratio=1.0), "mask_ratio"),
    (dict(mask_replace="random"), "mask_replace"),
    (dict(tokens=torch.tensor([[1, 2, 128]])), "vocabulary"),
    (dict(tokens=torch.tensor([[1, -1, 2]])), "vocabulary"),
    (dict(tokens=torch.tensor([[1]]), objective="clm"), "length"),
    (dict(tokens=torch.ones(5, dtype=torch.long)), "batch, length"),
    (dict(tokens=torch.ones(2, 5)), "integer"),
])
def test_bad_input_is_a_clear_error(bad, message):
    args = dict(tokens=random_tokens((2, 8)), objective="mlm", mask_ratio=0.4, mask_replace="mask") | bad
    with pytest.raises(ValueError, match=message):
        O.pretraining_loss(tiny_model(), args.pop("tokens"), args.pop("objective"), VOCAB, **args)


# ---------------------------------------------------------------------------------------------------------------
# The model


def test_causal_flag_controls_what_a_position_sees():
    model = tiny_model()
    a = random_tokens((1, 20))
    b = a.clone()
    b[0, 12] = (b[0, 12] + 1) % 100  # change one token in the "future" of positions 0..11
    for attention in ("sdpa", "manual"):
        model.config.attention = attention  # the attention path is read at call time
        with torch.no_grad():
            ca, cb = model(a, causal=True), model(b, causal=True)
            ba, bb = model(a, causal=False), model(b, causal=False)
        assert torch.allclose(ca[0, :12], cb[0, :12], atol=1e-6), "causal: the past saw the future"
        assert not torch.allclose(ca[0, 12:], cb[0, 12:], atol=1e-4)
        assert not torch.allclose(ba[0, :12], bb[0, :12], atol=1e-4), "bidirectional: the past did not see it"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_and_manual_attention_agree(causal, padded):
    sdpa, manual = tiny_model(seed=1), tiny_model(seed=1, attention="manual")
    tokens = random_tokens((3, 24))
    mask = None
    if padded:
        mask = torch.ones(3, 24, dtype=torch.bool)
        mask[1, 15:] = False
        mask[2, 20:] = False
    out_s, out_m = sdpa(tokens, causal, mask), manual(tokens, causal, mask)
    assert torch.allclose(out_s, out_m, atol=1e-5)
    out_s.square().mean().backward()
    out_m.square().mean().backward()
    for (name, ps), pm in zip(sdpa.named_parameters(), manual.parameters()):
        if name != "lm_head.weight":  # not part of the forward pass
            assert torch.allclose(ps.grad, pm.grad, atol=1e-5 * ps.grad.abs().max()), name


def test_padding_mask_hides_padding():
    model = tiny_model()
    a = random_tokens((1, 16))
    b = a.clone()
    b[0, 10:] = 3  # different padding content
    mask = torch.arange(16).unsqueeze(0) < 10
    with torch.no_grad():
        ha, hb = model(a, False, mask), model(b, False, mask)
    assert torch.allclose(ha[0, :10], hb[0, :10], atol=1e-6)


def test_rope_scores_depend_only_on_the_offset():
    D = 16
    cos, sin = M.rope_tables(D, 64, 10000.0)
    q, k = torch.randn(D), torch.randn(D)

    def score(i, j):  # query at position i, key at position j, both rotated by their own position
        return (M.apply_rope(q, cos[i], sin[i]) @ M.apply_rope(k, cos[j], sin[j])).item()

    assert score(5, 2) == pytest.approx(score(40, 37), abs=1e-5)
    assert score(0, 0) == pytest.approx(score(50, 50), abs=1e-5) == pytest.approx((q @ k).item(), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)
    # a rotation keeps the norm
    assert M.apply_rope(q, cos[7], sin[7]).norm().item() == pytest.approx(q.norm().item(), rel=1e-5)


def test_gqa_equals_full_attention_with_repeated_kv():
    gqa = tiny_model(seed=2)  # test preset: 4 query heads, 2 KV heads
    full = tiny_model(seed=2, n_kv_head=4)
    state = gqa.state_dict()
    for name, w in state.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # (2 KV heads * 16, 64) -> (4 heads * 16, 64)
            state[name] = w.view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
    full.load_state_dict(state)
    tokens = random_tokens((2, 20))
    for causal in (True, False):
        assert torch.allclose(gqa(tokens, causal), full(tokens, causal), atol=1e-5)


@pytest.mark.parametrize("preset, paper_size", [("210m", 212e6), ("610m", 608e6), ("1b", 1.19e9)])
def test_preset_sizes_match_the_paper(preset, paper_size):
    with torch.device("meta"):  # counts parameters without allocating them
        model = M.Transformer(M.model_config(preset, vocab_size=128_256))
    n = model.num_params()
    assert abs(n["paper"] - paper_size) / paper_size < 0.01
    assert n["total"] == sum(p.numel() for p in model.parameters())  # 128,256 is already a multiple of 64
    assert model.config.head_dim == {"210m": 64, "610m": 64, "1b": 96}[preset]


def test_vocab_is_padded_and_tied_embeddings_share_weights():
    cfg = M.model_config("test", vocab_size=8195)
    assert cfg.padded_vocab_size == 8256
    tied = M.Transformer(M.model_config("test", vocab_size=100, tie_embeddings=True))
    assert tied.lm_head.weight is tied.embed.weight
    n = tied.num_params()
    assert n["lm_head"] == 0 and n["total"] == n["paper"]


def test_init_and_no_biases():
    model = M.Transformer(M.model_config("tiny", vocab_size=8195))
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.blocks[0].mlp.up_proj.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert (model.norm.weight == 1).all()


def test_flops_per_token_convention():
    model = tiny_model()
    n = model.num_params()
    C, L, V = model.config.n_embd, model.config.n_layer, model.config.padded_vocab_size
    assert model.flops_per_token(32, causal=False) == 6 * n["body"] + 6 * V * C + 12 * L * C * 32
    # causal attention costs half; an MLM head on 40% of positions costs 40% of the head
    assert model.flops_per_token(32, causal=True) == 6 * n["body"] + 6 * V * C + 6 * L * C * 32
    assert model.flops_per_token(32, causal=False, head_fraction=0.4) == pytest.approx(
        6 * n["body"] + 0.4 * 6 * V * C + 12 * L * C * 32)


def test_optimizer_decays_matrices_only():
    model = tiny_model()
    opt = M.configure_optimizer(model, lr=1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-5


@pytest.mark.parametrize("bad", [dict(n_head=3), dict(n_kv_head=3), dict(attention="flash"), dict(n_embd=60)])
def test_bad_model_config_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="bad ModelConfig"):
        M.model_config("test", vocab_size=100, **bad)
    with pytest.raises(ValueError, match="unknown model preset"):
        M.model_config("7b", vocab_size=100)


# ---------------------------------------------------------------------------------------------------------------
# Data: tokenizers, corpora, token files, the block loader (data.py)

UNICODE_TEXT = "Héllo wörld — naïve café, 東京 and emoji 🤖🚀; tabs\tand\nnewlines  x² ∑ 𝔘"




@pytest.mark.parametrize("name, n_ordinary", [("cl100k", 100256), ("cl100k_8k", 8192), ("cl100k_16k", 16384)])
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
    assert tok.decode([tok.eot_id, tok.mask_id, tok.pad_id]) == "".join(data.SPECIAL_TOKENS)


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

# docstring corpus


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


LONG = "This sentence is long enough to count as a real piece of English prose for the corpus."


def _fake_tree(root):
    _write(root / "stdlib" / "alpha.py", f'"""{LONG} (alpha module)"""\n'
           f'class A:\n    """{LONG} (A)"""\n    def m(self):\n        """{LONG} (A.m)"""\n'
           f'    def short(self):\n        """Too short."""\n'
           f'if True:\n    def g():\n        """{LONG} (g)"""\n        def inner():\n            """{LONG} (inner)"""\n'
           f'async def h():\n    """{LONG} (A)"""\n')  # duplicate text of A: dropped
    _write(root / "stdlib" / "pkg" / "__init__.py", f'"""{LONG} (pkg)"""\n')
    _write(root / "stdlib" / "pkg" / "tests" / "test_x.py", f'"""{LONG} (test)"""\n')
    _write(root / "stdlib" / "site-packages" / "other" / "__init__.py", f'"""{LONG} (site)"""\n')
    _write(root / "stdlib" / "broken.py", 'print "python 2"\n')
    _write(root / "sp" / "numpy" / "__init__.py", f'"""{LONG} (numpy)"""\n')
    _write(root / "sp" / "numpy" / "linalg" / "_linalg.py", f'def svd(a):\n    """{LONG} (svd)"""\n')
    _write(root / "sp" / "numpy" / "testing" / "utils.py", f'"""{LONG} (testing)"""\n')
    _write(root / "sp" / "torch" / "nn.py", f'class Linear:\n    def forward(self):\n        """{LONG} (fwd)"""\n')


def test_docstring_extraction_on_fake_packages(tmp_path, monkeypatch):
    _fake_tree(tmp_path)
    monkeypatch.setattr(data.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path / "stdlib")})
    monkeypatch.setattr(data.importlib.util, "find_spec",
                        lambda name: types.SimpleNamespace(submodule_search_locations=[str(tmp_path / "sp" / name)]))
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
    assert splits == [split_of(Document("other", d.module, d.name, "other text")) for d in docs]  # key is module:name
    frac = {s: splits.count(s) / len(splits) for s in ("train", "val", "heldout")}
    assert abs(frac["train"] - 0.85) < 0.015 and abs(frac["val"] - 0.05) < 0.01 and abs(frac["heldout"] - 0.10) < 0.01
    # pinned values: the heldout set must never move between versions or machines
    keys = [("json.decoder", "JSONDecoder.decode"), ("json.decoder", "scandir"), ("os", "namedtuple")]
    assert [split_of(Document("stdlib", m, n, "")) for m, n in keys] == ["train", "val", "heldout"]


@pytest.fixture(scope="module")
def real_docs():
    return docstring_documents()  # the one real extraction of this file (~20-30 s)


def test_real_docstring_corpus(real_docs):
    assert len(real_docs) > 10_000
    assert sum(len(d.text) for d in real_docs) > 1_000_000
    assert {d.source for d in real_docs} == {"stdlib", "numpy", "torch"}
    assert {split_of(d) for d in real_docs} == {"train", "val", "heldout"}
    assert len({d.text for d in real_docs}) == len(real_docs)
    assert all(len(d.text) >= 64 for d in real_docs)
    assert not any(".tests." in d.module or d.module.startswith("test.") for d in real_docs)
    json_doc = next(d for d in real_docs if d.module == "json.decoder" and d.name == "JSONDecoder.decode")
    assert "Python representation" in json_doc.text
    # deterministic order: sources in stdlib, numpy, torch order, modules in sorted-walk order within each
    sources = [d.source for d in real_docs]
    assert sources == sorted(sources, key=["stdlib", "numpy", "torch"].index)


def test_prepare_docstrings_excludes_heldout(tmp_path, monkeypatch, real_docs):
    subset = real_docs[:400]
    monkeypatch.setattr(data, "docstring_documents", lambda: subset)
    meta = prepare("docstrings", str(tmp_path), "cl100k_8k")
    tok = get_tokenizer("cl100k_8k")
    for split in ("train", "val"):
        stream = np.fromfile(tmp_path / f"{split}.bin", dtype=np.uint16)
        texts = tok.decode(stream).split("<|endoftext|>")[:-1]
        assert texts == [d.text for d in subset if split_of(d) == split]
        assert meta["n_documents"][split] == len(texts) and meta["n_tokens"][split] == len(stream)
    assert meta["source"] == "docstrings"
    # the held-out rest is saved beside the tokens, so fine-tuning reads it instead of parsing the sources again
    heldout = [d for d in subset if split_of(d) == "heldout"]
    monkeypatch.setattr(data, "docstring_documents", lambda: pytest.fail("parsed again"))
    assert heldout and list(data.heldout_documents(str(tmp_path))) == heldout
    write_jsonl(tmp_path / "docs.jsonl", [{"text": f"document {i}"} for i in range(20)])
    prepare(str(tmp_path / "docs.jsonl"), str(tmp_path), "cl100k_8k", val_fraction=0.5)
    assert not (tmp_path / data.HELDOUT_FILE).exists()  # re-prepared with other data: the old list is gone

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
    assert sorted(f for f in os.listdir(out) if f != ".lock") == ["meta.json", "train.bin", "val.bin"]
    # a directory source and a re-run give identical files
    meta2 = prepare(str(tmp_path / "corpus"), str(tmp_path / "out2"), tokenizer, val_fraction=0.3)
    assert meta2["n_tokens"] == meta["n_tokens"]
    assert (out / "train.bin").read_bytes() == (tmp_path / "out2" / "train.bin").read_bytes()


def test_prepare_jsonl_text_field_seed_and_max_tokens(tmp_path):
    rows = [{"id": i, "content": f"Row number {i} says hello, ünïcödé 🚀."} for i in range(60)]
    _write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in rows[:30]) + "\n\n")
    _write(tmp_path / "b.jsonl", "\n".join(json.dumps(r) for r in rows[30:]))
    tok = get_tokenizer("cl100k_8k")
    meta = prepare(str(tmp_path / "*.jsonl"), str(tmp_path / "out"), text_field="content", val_fraction=0.25)
    docs = [d for split in ("train", "val") for d in _decode_split(tmp_path / "out", split, tok, np.uint16)]
    assert sorted(docs) == sorted(r["content"] for r in rows)
    other = prepare(str(tmp_path / "*.jsonl"), str(tmp_path / "out_seed"), text_field="content", val_fraction=0.25,
                    seed=1)
    assert other["n_documents"] != meta["n_documents"] or \
        (tmp_path / "out" / "val.bin").read_bytes() != (tmp_path / "out_seed" / "val.bin").read_bytes()
    n_doc = len(tok.encode(rows[0]["content"])) + 1
    small = prepare(str(tmp_path / "*.jsonl"), str(tmp_path / "small"), text_field="content", val_fraction=0.5,
                    max_tokens=20 * n_doc + 3)
    assert sum(small["n_tokens"].values()) <= 20 * n_doc + 3
    assert sum(small["n_documents"].values()) == 20  # whole documents only


@pytest.mark.parametrize("line, match", [('{"text": "ok"', "invalid JSON"), ('{"body": "no text"}', "'text'"),
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
        return iter([{"text": f"Educational page {i} about photosynthesis."} for i in range(10_000)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    meta = prepare("fineweb-edu:sample-100BT", str(tmp_path / "out"), max_tokens=5000)
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-100BT", "train", True)]
    assert 4900 < sum(meta["n_tokens"].values()) <= 5000 and meta["n_documents"]["val"] > 0

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
    assert str(train) in str(e.value) and f"{size - 2:,}" in str(e.value) and f"{size:,}" in str(e.value)
    prepare(str(tmp_path / "c"), str(tmp_path / "d"), val_fraction=0.3)  # overwrites a prepared dir
    os.remove(tmp_path / "d" / "val.bin")
    with pytest.raises(FileNotFoundError, match="val.bin"):
        load_meta(str(tmp_path / "d"))


def test_check_tokenizer():
    meta = {**get_tokenizer("cl100k_8k").meta(), "dtype": "uint16"}
    check_tokenizer(meta, get_tokenizer("cl100k_8k").meta())
    with pytest.raises(ValueError) as e:
        check_tokenizer(meta, get_tokenizer("cl100k_16k").meta())
    assert "the data was prepared with cl100k_8k, but the model uses cl100k_16k" in str(e.value)
    with pytest.raises(ValueError, match="mask_id 8193 against 5"):
        check_tokenizer(meta, {**meta, "mask_id": 5})

# BlockLoader, on a synthetic stream where token i == i, so a block's first token tells which block it is

N_TOKENS, T = 1005, 10  # 100 blocks, 5 tail tokens dropped


@pytest.fixture()
def stream_dir(tmp_path):
    meta = {**get_tokenizer("cl100k_8k").meta(), "dtype": "uint16", "source": "synthetic",
            "n_tokens": {"train": N_TOKENS, "val": 3 * T}, "n_documents": {"train": 1, "val": 1}, "format_version": 1}
    np.arange(N_TOKENS, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(3 * T, dtype=np.uint16).tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return str(tmp_path)


def _blocks(x):
    assert x.dtype == torch.int64 and x.shape[1] == T
    assert torch.equal(x - x[:, :1], torch.arange(T).expand_as(x))  # each row is a contiguous slice of the stream
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
    expected = np.concatenate([np.random.default_rng([3, e]).permutation(100) for e in range(2)]).tolist()
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
        _write(tmp_path / "c" / f"{i:02d}.txt", f"Document {i}. " + "All work and no play makes a dull model. " * 5)
    prepare(str(tmp_path / "c"), str(tmp_path / "d"), val_fraction=0.2)
    stream = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint16).astype(np.int64)
    loader = BlockLoader(str(tmp_path / "d"), "train", 16, 2, seed=0)
    order = np.random.default_rng([0, 0]).permutation(loader.n_blocks)
    assert loader.n_blocks == len(stream) // 16
    x = loader.next_batch()
    assert torch.equal(x, torch.from_numpy(np.stack([stream[b * 16:(b + 1) * 16] for b in order[:2]])))

# CLI


def test_cli(tmp_path):
    for i in range(10):
        _write(tmp_path / "c" / f"{i}.txt", f"CLI document number {i}.")

    def run(*args):
        return subprocess.run([sys.executable, os.path.join(HERE, "data.py"), *args], capture_output=True, text=True,
                              cwd=tmp_path)

    bad = run("--sorce=docstrings")
    assert bad.returncode != 0 and "unknown setting 'sorce'" in bad.stderr and "source" in bad.stderr
    ok = run(f"--source={tmp_path / 'c'}", "--tokenizer=cl100k_16k", "--val_fraction=0.5", "--max_tokens=1e3")
    assert ok.returncode == 0, ok.stderr
    meta = load_meta(str(tmp_path / data.default_data_dir(str(tmp_path / "c"), "cl100k_16k")))
    assert meta["tokenizer"] == "cl100k_16k" and sum(meta["n_documents"].values()) == 10


# ---------------------------------------------------------------------------------------------------------------
# Training: the schedule, the switch, resume, DDP (train.py)




@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A few thousand tokens of word salad, prepared with the real tokenizer: enough blocks for short runs."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "the encoder sees both sides while a decoder looks left only and predicts what comes next".split()
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(rng.randint(100, 400))))
    data.prepare(str(root / "*.txt"), str(root / "data"), "cl100k_8k")
    return str(root / "data")


def run_args(data_dir, out_dir, **overrides):
    settings = dict(data_dir=data_dir, out_dir=out_dir, model="test", block_size=32, batch_size=2, max_steps=8,
                    warmup_steps=2, decay_steps=2, switch_at=0.5, eval_interval=4, eval_batches=2, lr=3e-3,
                    progress=False) | overrides
    return [f"--{k}={v}" for k, v in settings.items()]


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if "loss" in r], [r for r in records if "val_clm" in r]


def test_lr_schedule_is_warmup_stable_decay():
    cfg = train.TrainConfig(max_steps=100, warmup_steps=10, decay_steps=20, lr=1.0)
    lrs = [train.lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0  # linear from 0
    assert all(lr == 1.0 for lr in lrs[10:80])  # stable
    assert lrs[80] == 1.0 and lrs[99] == pytest.approx(1 / 20)  # linear decay, reaching 0 after the last step
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:]))


def test_switch_step_and_objective():
    cfg = train.TrainConfig(max_steps=40, objective="clm", switch_to="mlm", switch_at=0.25)
    assert train.switch_step(cfg) == 10
    assert [train.objective_at(s, cfg) for s in (0, 9, 10, 39)] == ["clm", "clm", "mlm", "mlm"]
    cfg.switch_at = 30.0  # a step, not a fraction
    assert train.objective_at(29, cfg) == "clm" and train.objective_at(30, cfg) == "mlm"
    cfg.switch_to = "none"
    assert train.switch_step(cfg) is None and train.objective_at(39, cfg) == "clm"


def test_run_switches_objective_keeps_optimizer_and_does_not_rewarm(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    train.main(run_args(tiny_data, out))
    steps, evals = read_log(out)
    assert [r["objective"] for r in steps] == ["clm"] * 4 + ["mlm"] * 4
    cfg = train.TrainConfig(max_steps=8, warmup_steps=2, decay_steps=2, lr=3e-3)
    assert [r["lr"] for r in steps] == pytest.approx([train.lr_at(s, cfg) for s in range(8)])
    assert steps[4]["lr"] == 3e-3  # the first MLM step runs at the peak: no new warmup
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    # one optimizer for the whole run: AdamW's step count spans both phases
    assert all(state["step"].item() == 8 for state in ckpt["optimizer"]["state"].values())
    assert [e["step"] for e in evals] == [0, 4, 8]
    assert evals[-1]["val_clm"] < evals[0]["val_clm"] and evals[-1]["val_mlm"] < evals[0]["val_mlm"]


def test_resume_is_exact(tiny_data, tmp_path):
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    train.main(run_args(tiny_data, whole))
    train.main(run_args(tiny_data, split, stop_at=3))  # stops mid-CLM, with a checkpoint
    assert torch.load(os.path.join(split, "ckpt.pt"), weights_only=True)["step"] == 3
    train.main(run_args(tiny_data, split, init_from="resume"))
    (steps_a, evals_a), (steps_b, evals_b) = read_log(whole), read_log(split)
    timing = ("tokens_per_s", "mfu")
    assert [{k: v for k, v in r.items() if k not in timing} for r in steps_a] == \
           [{k: v for k, v in r.items() if k not in timing} for r in steps_b]
    assert evals_a == [e for e in evals_b if e["step"] != 3]  # the stop added an evaluation at step 3
    a = torch.load(os.path.join(whole, "ckpt.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(split, "ckpt.pt"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_averages_over_predicted_tokens():
    """Two MLM micro-batches predict different numbers of tokens; the step must follow the gradient of the mean over
    all of them, as one big batch would, not the mean of the two micro-batch means."""
    cfg = train.TrainConfig(objective="mlm", switch_to="none", max_steps=10, warmup_steps=0, decay_steps=0, lr=1.0)
    batches = [random_tokens((2, 32), seed=1), random_tokens((2, 32), seed=2)]
    model, reference = tiny_model(), tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)  # plain SGD: the update is the (clipped) gradient itself
    gen = torch.Generator()
    it = iter(batches)
    train.train_step(model, opt, lambda: next(it), cfg, VOCAB, 5, 2, gen)
    # the same step by hand
    total, count = 0.0, 0
    for micro, tokens in enumerate(batches):
        inputs, labels = O.mask_tokens(tokens, VOCAB, cfg.mask_ratio, generator=train.reseed(gen, 0, 5, micro))
        logits = reference.logits(reference(inputs, causal=False))
        total = total + F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        count += (labels != O.IGNORE).sum().item()
    (total / count).backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    with torch.no_grad():
        for p, q in zip(model.parameters(), reference.parameters()):
            assert torch.allclose(p, q - q.grad, atol=1e-6)


def test_ddp_two_processes_match_one(tiny_data, tmp_path):
    """torchrun with 2 CPU processes (gloo), 1 micro-batch each == 1 process with 2 micro-batches: same data, same
    masks, same losses, through the objective switch."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train.main(run_args(tiny_data, one, total_batch_size=4))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(HERE, "train.py"), *run_args(tiny_data, two, total_batch_size=4)],
                            capture_output=True, text=True, env=env, cwd=HERE, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (steps1, evals1), (steps2, evals2) = read_log(one), read_log(two)
    assert [r["objective"] for r in steps2] == [r["objective"] for r in steps1]
    assert [r["loss"] for r in steps2] == pytest.approx([r["loss"] for r in steps1], rel=1e-4)
    assert [e["val_mlm"] for e in evals2] == pytest.approx([e["val_mlm"] for e in evals1], rel=1e-4)


def test_device_choice_on_a_gpu_machine(monkeypatch):
    """What train/finetune/bench do on CUDA, checked on a CPU by standing in for torch.cuda: the device always has
    an index (torch.cuda.set_device refuses "cuda" alone), each torchrun process takes its local rank's GPU, and
    autocast is bfloat16 unless float32 is asked for."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(torch.cuda._utils._get_device_index(d)))
    device, autocast = train.device_and_autocast("auto", "auto")
    assert device == torch.device("cuda", 0) and chosen == [0]
    assert autocast is not nullcontext  # bfloat16 (torch.autocast itself needs a CUDA build to be entered)
    assert train.device_and_autocast("cuda", "auto", local_rank=3, world_size=4)[0] == torch.device("cuda", 3)
    assert train.device_and_autocast("cuda:1", "float32")[1] is nullcontext
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert train.device_and_autocast("auto", "auto") == (torch.device("cpu"), nullcontext)


@pytest.mark.parametrize("argv, message", [
    (["--max_step=5"], "unknown setting 'max_step'.*max_steps"),
    (["--max_steps=five"], "max_steps must be of type int"),
    (["--lr=fast"], "lr must be of type float"),
    (["--compile=maybe"], "compile must be"),
    (["--objective=mlm", "--switch_to=mlm"], "switch_to equals objective"),
    (["--switch_at=1.5", "--max_steps=1"], "switch_at"),
    (["--warmup_steps=300", "--decay_steps=300"], "warmup_steps"),
    (["--objective=bert"], "objective must be"),
    (["--max_steps"], "--max_steps=VALUE"),
    (["nonexistent.py"], "not found"),
    (["train"], "unexpected argument"),
])
def test_bad_settings_fail_before_any_work(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        train.main(argv + [f"--out_dir={tmp_path}"])


def test_config_files_and_help(tmp_path, capsys):
    preset = tmp_path / "preset.py"
    preset.write_text("model = '210m'\nblock_size = 2048\nlr = 5e-4\nmax_steps = 42_000\n")
    cfg = train.configure(train.TrainConfig, [str(preset), "--lr=1e-4", "--max_steps=1e3"])
    assert (cfg.model, cfg.block_size, cfg.lr, cfg.max_steps) == ("210m", 2048, 1e-4, 1000)
    bad = tmp_path / "bad.py"
    bad.write_text("mask_ratio = '40%'\n")
    with pytest.raises(SystemExit, match="mask_ratio must be of type float.*bad.py"):
        train.configure(train.TrainConfig, [str(bad)])
    with pytest.raises(SystemExit):
        train.configure(train.TrainConfig, ["--help"])
    out = capsys.readouterr().out
    assert "--switch_at=0.25" in out and "fraction of max_steps" in out


def test_existing_run_is_not_overwritten_and_bad_data_is_clear(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    train.main(run_args(tiny_data, out, max_steps=4, switch_at=2))
    with pytest.raises(SystemExit, match="init_from=resume"):
        train.main(run_args(tiny_data, out, max_steps=4, switch_at=2))
    with pytest.raises(SystemExit, match="prepared with cl100k_8k"):
        train.main(run_args(tiny_data, str(tmp_path / "other"), tokenizer="cl100k_16k"))


def test_continued_pretraining_starts_from_weights(tiny_data, tmp_path):
    base, cpt = str(tmp_path / "clm"), str(tmp_path / "cpt")
    train.main(run_args(tiny_data, base, objective="clm", switch_to="none", max_steps=4))
    train.main(run_args(tiny_data, cpt, init_from=os.path.join(base, "ckpt.pt"), objective="mlm", switch_to="none",
                        max_steps=4))
    (_, base_evals), (cpt_steps, cpt_evals) = read_log(base), read_log(cpt)
    assert cpt_evals[0] == dict(base_evals[-1], step=0)  # starts exactly where the CLM run ended
    assert [r["objective"] for r in cpt_steps] == ["mlm"] * 4
    assert cpt_steps[0]["tokens"] == 2 * 32  # a new run: fresh schedule and step count
    # ... on the blocks after the source's: CPT reads on in the same data stream
    assert torch.load(os.path.join(cpt, "ckpt.pt"), weights_only=False)["data"]["position"] == 8 * 2
    other = str(tmp_path / "other_seed")  # another data order is another stream: it starts at its beginning
    train.main(run_args(tiny_data, other, init_from=os.path.join(base, "ckpt.pt"), objective="mlm",
                        switch_to="none", max_steps=4, seed=1))
    assert torch.load(os.path.join(other, "ckpt.pt"), weights_only=False)["data"]["position"] == 4 * 2


# ---------------------------------------------------------------------------------------------------------------
# Benchmarks (bench.py): every code path for a step or two on the test preset, no timing assertions


def test_bench_comparisons_scaling_and_report(tmp_path, capsys):
    out, trace = tmp_path / "bench.txt", tmp_path / "trace.json"
    bench.main(["--model=test", "--block_size=32", "--batch_size=2", "--steps=1", "--warmup=1",
                "--compare=objective,head,attention,loader", "--scaling=true", "--scaling_models=test",
                "--scaling_contexts=16,32", f"--out={out}", f"--profile={trace}"])
    text = out.read_text()
    for expected in ("mlm, dense head", "clm, manual attention", "MLM step vs CLM step",
                     "MLM sparse head vs dense head",
                     "SDPA vs manual attention, MLM", "data loader alone", "command: python bench.py"):
        assert expected in text
    assert text.count("\nclm ") + text.count("\nmlm ") >= 2 + 4  # the two base rows and the 2 x 2 scaling rows
    assert json.loads(trace.read_text())["traceEvents"]
    bench.main(["--model=test", "--block_size=16", "--batch_size=2", "--steps=1", "--warmup=0", "--compare=",
                "--json=true"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["objective"] for r in rows] == ["clm", "mlm"] and all(r["tokens_per_s"] > 0 for r in rows)


def test_bench_compiled_step_on_cpu(tmp_path):
    """torch.compile's CPU backend runs the same train_step as the GPU one would."""
    out = tmp_path / "bench.txt"
    bench.main(["--model=test", "--block_size=16", "--batch_size=2", "--steps=1", "--warmup=1", "--compare=compile",
                "--compile=false", f"--out={out}"])
    assert "compiled vs eager, CLM" in out.read_text() and "mlm, compiled" in out.read_text()


def test_bench_rejects_unknown_comparison_and_gpu_suite_without_gpu():
    with pytest.raises(SystemExit, match="unknown comparison"):
        bench.main(["--compare=objective,speed"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA device"):
            bench.main(["--suite=gpu"])


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning and evaluation (finetune.py)

TOK = data.get_tokenizer("cl100k_8k")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second thread gains nothing, and on a busy machine the threads of each small op wait
    on each other (20x slower here with 2 threads while other processes ran)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_checkpoint(path, block_size=64, seed=0):
    torch.manual_seed(seed)
    m = model.Transformer(model.model_config("test", vocab_size=TOK.n_vocab, block_size=block_size))
    torch.save(model.checkpoint_payload(m, tokenizer=TOK.meta()), path)
    return str(path)


def make_family(name, records, max_len=64, **settings):
    cfg = ft.FinetuneConfig(progress=False, **settings)
    rows = [(f"train.jsonl, line {i + 1}", r) for i, r in enumerate(records)]
    return ft.FAMILIES[name](cfg, TOK, rows, torch.device("cpu"), nullcontext, max_len), cfg


def rows(records, name="file.jsonl"):
    return [(f"{name}, line {i + 1}", r) for i, r in enumerate(records)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# # Metrics against hand-computed values


def test_bio_entities_read_like_conlleval():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "I-PER", "B-ORG", "B-ORG"]
    # I-LOC after O starts an entity; B-LOC right after splits; I-PER after LOC starts a PER; B-ORG B-ORG is two
    assert ft.bio_entities(tags) == {(0, 2, "PER"), (3, 5, "LOC"), (5, 6, "LOC"), (6, 7, "PER"), (7, 8, "ORG"),
                                     (8, 9, "ORG")}


def test_entity_f1_partial_overlaps_and_types():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-LOC", "I-LOC"]]
    # gold: PER 0-2, LOC 3-4, ORG 0-1; predicted: PER 0-1 (span too short), LOC 3-4 (exact), LOC 0-2 (wrong span
    # and type): 1 correct of 3 predicted and 3 gold
    scores = ft.entity_f1(gold, pred)
    assert scores == pytest.approx({"precision": 1 / 3, "recall": 1 / 3, "f1": 1 / 3})
    assert ft.entity_f1(gold, gold)["f1"] == 1.0
    assert ft.entity_f1([["B-PER", "I-PER"]], [["B-PER", "I-LOC"]])["f1"] == 0.0  # the type change splits the span
    assert ft.entity_f1([["O"]], [["O"]])["f1"] == 0.0


def test_squad_normalisation_exact_and_f1():
    assert ft.normalize_answer("  The Quick,  brown fox!") == "quick brown fox"
    assert ft.normalize_answer("an apple a day; theater") == "apple day theater"  # articles only as whole words
    assert ft.squad_scores("Cat.", ["the cat"]) == (1.0, 1.0)
    exact, f1 = ft.squad_scores("the cat sat", ["A cat sat on the mat", "cat"])
    # vs "cat sat on mat": 2 common, P 1, R 1/2, F1 2/3; vs "cat": P 1/2, R 1, F1 2/3
    assert exact == 0.0 and f1 == pytest.approx(2 / 3)
    assert ft.squad_scores("dog", ["cat"]) == (0.0, 0.0)
    # SQuAD v2: "" is the no-answer
    assert ft.squad_scores("", []) == (1.0, 1.0)
    assert ft.squad_scores("cat", []) == (0.0, 0.0)
    assert ft.squad_scores("", ["cat"]) == (0.0, 0.0)
    assert ft.squad_scores("the", ["cat"]) == (0.0, 0.0)  # normalises to the empty answer


def test_ndcg_mrr_graded_relevance():
    ranked = [[3, 1, 2, 0], [0, 1], list(range(20, 31)) + [4]]
    relevance = [{1: 2, 2: 1, 5: 1}, {0: 0}, {4: 3}]
    dcg = 0 + 2 / math.log2(3) + 1 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)  # ideal: grades 2, 1, 1 (doc 5 never retrieved)
    # query 2 has no relevant document: left out; query 3's only relevant document is 12th: 0 for both metrics
    scores = ft.ndcg_mrr(ranked, relevance, k=10)
    assert scores["ndcg@10"] == pytest.approx((dcg / idcg + 0) / 2)
    assert scores["mrr@10"] == pytest.approx((1 / 2 + 0) / 2)
    assert ft.ndcg_mrr([[7, 8]], [{7: 1}], k=10) == {"ndcg@10": 1.0, "mrr@10": 1.0}
    with pytest.raises(ValueError, match="no query has a relevant document"):
        ft.ndcg_mrr([[0]], [{0: 0}])


def test_ranking_ties_keep_corpus_order():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1], [1.0, 1.0, 1.0, 1.0, 1.0]])
    assert ft.rank_documents(scores, 10) == [[1, 3, 0, 2, 4], [0, 1, 2, 3, 4]]
    assert ft.rank_documents(scores, 2) == [[1, 3], [0, 1]]


def test_t_quantiles_and_confidence_interval():
    assert ft.t975(1) == 12.7062 and ft.t975(4) == 2.7764 and ft.t975(30) == 2.0423
    assert ft.t975(50) == pytest.approx(2.0086, abs=2e-4)  # Student's t: 2.00856
    assert ft.t975(10 ** 6) == pytest.approx(1.95997, abs=1e-4)
    mean, half = ft.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and half == pytest.approx(2.7764 * math.sqrt(2.5) / math.sqrt(5))  # = 1.9632
    assert ft.mean_ci([4.0]) == (4.0, None)


def test_report_means_intervals_choice_and_stability():
    def cell(lr, seed, val, test):
        return {"lr": lr, "seed": seed, "val": {"accuracy": val}, "test": {"accuracy": test}, "diverged_at": None}
    results = [cell(1e-4, 0, 70, 60), cell(1e-4, 1, 72, 62), cell(1e-4, 2, 74, 67),
               cell(1e-3, 0, 80, 70), cell(1e-3, 1, 80, 72), cell(1e-3, 2, 80, 74),
               cell(1e-2, 0, 10, 10), cell(1e-2, 1, 10, 10), cell(1e-2, 2, 40, 10) | {"diverged_at": 3}]
    rep = ft.report(results, "accuracy")
    row = rep["per_lr"][0]
    assert row["val_mean"] == 72 and row["test_mean"] == pytest.approx(63)
    sd = statistics.stdev([60, 62, 67])  # 3.6056
    assert row["test_ci95"] == pytest.approx(4.3027 * sd / math.sqrt(3))  # 8.957
    assert rep["per_lr"][1]["val_ci95"] == 0.0 and rep["per_lr"][2]["diverged"] == 1
    assert rep["chosen_lr"] == 1e-3 and rep["test_mean"] == 72
    assert rep["test_ci95"] == pytest.approx(4.3027 * 2 / math.sqrt(3))
    assert rep["stability_sd"] == pytest.approx(statistics.stdev([63, 72, 10]))


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [ft.lr_factor(s, 10, 1) for s in range(10)]
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(1 / 9) and factors == sorted(factors, reverse=True)
    assert [ft.lr_factor(s, 20, 2) for s in range(3)] == [0.5, 1.0, 1.0]


# # Tokens, words and characters


def test_align_words_first_subtoken_per_word():
    words = ["Hello", "wörld", "tokenization", "x"]
    ids, starts = ft.align_words(TOK, words, 64)
    assert TOK.decode(ids) == "Hello wörld tokenization x"
    bounds = starts + [len(ids)]
    assert [TOK.decode(ids[a:b]).strip() for a, b in zip(bounds, bounds[1:])] == words
    ids3, starts3 = ft.align_words(TOK, words, bounds[3])  # room for three words only
    assert starts3 == starts[:3] and ids3 == ids[:bounds[3]]
    long_ids, long_starts = ft.align_words(TOK, ["a" * 300], 8)
    assert len(long_ids) == 8 and long_starts == [0]


def test_token_spans_cover_text_even_inside_multibyte_characters():
    text = "naïve 😀 café: ok"
    ids = TOK.encode(text)
    spans = ft.token_spans(TOK, ids, text)
    assert len(spans) == len(ids) and spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, in order
    assert "".join(text[s:e] for s, e in spans) == text


def test_pooling_ignores_padding():
    hidden = torch.arange(24, dtype=torch.float32).view(2, 3, 4)  # (B, T, C)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert torch.equal(ft.pool(hidden, mask, "mean")[0], hidden[0, :2].mean(0))
    assert torch.equal(ft.pool(hidden, mask, "last"), torch.stack([hidden[0, 1], hidden[1, 2]]))
    assert torch.equal(ft.pool(hidden, mask, "first"), hidden[:, 0])


def qa_example(answer_at_end=True):
    filler = " ".join(f"word{i}" for i in range(60))
    context = f"{filler} The secret code is Blue Falcon. {filler}" if answer_at_end else filler
    start = context.find("Blue Falcon")
    answers = {"text": ["Blue Falcon"], "answer_start": [start]} if answer_at_end else {"text": [], "answer_start": []}
    return {"id": "q1" if answer_at_end else "q0", "question": "What is the code?", "context": context,
            "answers": answers}


def test_qa_stride_windows_map_answers_back_to_characters():
    family, _ = make_family("qa", [qa_example(), qa_example(False)], max_len=48, doc_stride=24)
    split = family.encode(rows([qa_example(), qa_example(False)]))
    windows = [item for item in split.items if item[1][0] == "q1"]
    assert len(windows) > 5  # ~250 context tokens in windows of ~34
    for ids, _, lo, hi, offset, (s, e) in windows:
        assert len(ids) <= 48 and ids[offset + lo - 1] == TOK.eot_id and ids[-1] == TOK.eot_id
        if s != len(ids) - 1:  # the answer is in this window: its tokens decode to it
            assert TOK.decode(ids[s:e + 1]).strip() == "Blue Falcon"
    inside = [w for w in windows if w[5][0] != len(w[0]) - 1]
    assert len(inside) >= 2  # overlapping windows: the answer sits in more than one
    # oracle logits (peaks on each window's targets) must give back the exact character span, and "" for q0
    starts, ends = [], []
    for ids, *_, (s, e) in split.items:
        starts.append(torch.nn.functional.one_hot(torch.tensor(s), len(ids)).float() * 10)
        ends.append(torch.nn.functional.one_hot(torch.tensor(e), len(ids)).float() * 10)
    assert family.predict(split, starts, ends) == {"q1": "Blue Falcon", "q0": ""}
    assert family.score(split, {"q1": "blue falcon", "q0": ""}) == {"f1": 1.0, "exact": 1.0}


def test_window_starts_cover_the_context():
    assert ft.window_starts(10, 20, 5) == [0]
    assert ft.window_starts(100, 40, 10) == [0, 30, 60]  # 0-40, 30-70, 60-100


def test_parameter_sections_numpydoc_and_google():
    numpydoc = ("Sum of array elements.\n\nParameters\n----------\na : array_like\n    Elements to sum. Really.\n"
                "axis : int, optional\n    Axis along\n    which to sum\n\nReturns\n-------\nout : ndarray\n    Sum.")
    (start, end, params), = ft.parameter_sections(numpydoc)
    assert numpydoc[start:end] == ("Parameters\n----------\na : array_like\n    Elements to sum. Really.\n"
                                   "axis : int, optional\n    Axis along\n    which to sum")
    assert {name: numpydoc[s:e] for name, s, e in params} == {"a": "Elements to sum.",
                                                              "axis": "Axis along\n    which to sum"}
    google = ("Do it.\n\nArgs:\n    x (Tensor): the input. More text.\n    x1, x2: shared.\n"
              "    dim (int, optional): the\n        dimension\n\nReturns:\n    y (Tensor): the output.")
    (start, end, params), = ft.parameter_sections(google)
    assert google[start:end] == ("Args:\n    x (Tensor): the input. More text.\n    x1, x2: shared.\n"
                                 "    dim (int, optional): the\n        dimension")
    # "x1, x2" share one description: no single parameter to ask about
    assert {name: google[s:e] for name, s, e in params} == {"x": "the input.", "dim": "the\n        dimension"}
    assert ft.parameter_sections("No sections here.\n\nReturns:\n    y: z.") == []


def test_markup_to_bio():
    words, tags = ft.markup_to_bio("Call ``f(x, y)`` or :func:`~torch.nn.functional.relu` (see :math:`x^2`), "
                                   "not `np.sum`.")
    assert words == ["Call", "f(x,", "y)", "or", "relu", "(see", "x^2", "),", "not", "np.sum", "."]
    assert tags == ["O", "B-LIT", "I-LIT", "O", "B-REF", "O", "O", "O", "O", "B-REF", "O"]


# # Each head learns a small learnable task on a tiny random model, clearly above chance


def tiny_body(block_size=64):
    torch.manual_seed(0)
    return model.Transformer(model.model_config("test", vocab_size=TOK.n_vocab, block_size=block_size))


def train_and_score(name, train, test, lr=2e-3, steps=60, max_len=64, **settings):
    family, cfg = make_family(name, train, max_len=max_len, batch_size=16, max_steps=steps, warmup=0.1, **settings)
    splits = {"train": family.encode(rows(train)), "test": family.encode(rows(test))}
    return ft.finetune_cell(family, tiny_body(), splits, cfg, lr, seed=0), family, splits


FILLER = "the a movie film story plot actors scene was is and it of very quite".split()


def test_sequence_classification_head_learns():
    rng = random.Random(0)
    good, bad = "good great superb lovely".split(), "bad awful boring terrible".split()

    def example():
        label = rng.choice(["pos", "neg"])
        words = rng.choices(FILLER, k=8)
        words.insert(rng.randrange(9), rng.choice(good if label == "pos" else bad))
        return {"text": " ".join(words), "label": label}
    result, *_ = train_and_score("sc", [example() for _ in range(1000)], [example() for _ in range(200)])
    assert result["test"]["accuracy"] > 85  # chance: 50


def test_token_classification_head_learns():
    rng = random.Random(0)
    entities = [(["Alice"], "PER"), (["Bob"], "PER"), (["Paris"], "LOC"), (["New", "York"], "LOC")]

    def example():
        words, tags = [], []
        for _ in range(8):
            if rng.random() < 0.25:
                entity, kind = rng.choice(entities)
                words += entity
                tags += ["B-" + kind] + ["I-" + kind] * (len(entity) - 1)
            else:
                words.append(rng.choice(FILLER))
                tags.append("O")
        return {"words": words, "tags": tags}
    result, *_ = train_and_score("tc", [example() for _ in range(1000)], [example() for _ in range(200)])
    assert result["test"]["f1"] > 70  # chance (all O): 0


def test_question_answering_head_learns_including_no_answer():
    rng = random.Random(0)
    colours = "red green blue yellow purple orange".split()

    def example(i):
        words = rng.choices(FILLER, k=12)
        answers = {"text": [], "answer_start": []}
        if rng.random() < 0.7:
            at, colour = rng.randrange(13), rng.choice(colours)
            words.insert(at, colour)
            answers = {"text": [colour], "answer_start": [len(" ".join(words[:at] + [""]))]}
        return {"id": str(i), "question": "Which colour?", "context": " ".join(words), "answers": answers}
    train, test = [example(i) for i in range(1000)], [example(i) for i in range(200)]
    result, family, splits = train_and_score("qa", train, test, steps=60)
    trivial = 100 * family.trivial(splits["test"])["f1"]  # always "no answer" scores the unanswerable share
    assert 20 < trivial < 40 and result["test"]["f1"] > trivial + 30


def test_retrieval_head_learns_an_association():
    rng = random.Random(0)
    animals = "cat dog horse cow sheep goat mouse lion tiger bear wolf fox deer duck goose swan".split()
    things = "table chair window door spoon knife plate bottle pencil paper lamp clock phone shoe hat coat".split()
    thing_of = dict(zip(animals, rng.sample(things, len(things))))  # an arbitrary pairing the model must learn

    def records(n):
        pairs = {}
        while len(pairs) < n:
            animal = rng.choice(animals)
            document = " ".join(rng.choices(FILLER, k=4) + [thing_of[animal]])
            pairs[f"the {animal}", document] = {"query": f"the {animal}", "document": document}
        return list(pairs.values())
    train, test = records(1000), records(64)
    family, cfg = make_family("ir", train, batch_size=16, max_steps=60, temperature=0.05)
    splits = {"train": family.encode(rows(train)), "test": family.encode(rows(test))}
    body = tiny_body()
    with torch.no_grad():
        before = 100 * family.evaluate(body, None, splits["test"])["ndcg@10"]
    result = ft.finetune_cell(family, body, splits, cfg, 2e-3, seed=0)
    # 16 queries, each with ~4 relevant documents among 64: the untrained body ranks them about at random
    assert before < 40 and result["test"]["ndcg@10"] > before + 40



# # The command: the sweep, its report, restarts, bad input


def sc_files(tmp_path, n=64):
    rng = random.Random(1)
    records = [{"text": " ".join(rng.choices(FILLER, k=5) + [w]), "label": int(w == "good")}
               for w in rng.choices(["good", "bad"], k=n)]
    return write_jsonl(tmp_path / "train.jsonl", records), write_jsonl(tmp_path / "test.jsonl", records[:16])


def test_sweep_writes_report_and_restarts_without_redoing_cells(tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    train, test = sc_files(tmp_path)
    settings = {"init_from": ckpt, "task": "sc", "train": train, "test": test, "out_dir": f"{tmp_path}/out",
                "lrs": "1e-3,2e-3", "seeds": 2, "batch_size": 8, "max_steps": 3, "progress": False}
    argv = [f"--{k}={v}" for k, v in settings.items()]
    rep = ft.main(argv)
    lines = [json.loads(line) for line in open(tmp_path / "out" / "results.jsonl")]
    assert [(r["lr"], r["seed"]) for r in lines] == [(1e-3, 0), (1e-3, 1), (2e-3, 0), (2e-3, 1)]
    assert all(r["steps"] == 3 for r in lines)
    on_disk = json.load(open(tmp_path / "out" / "report.json"))
    assert on_disk["chosen_lr"] == rep["chosen_lr"] and len(on_disk["per_lr"]) == 2
    first = lines[0]["test"]["accuracy"], lines[1]["test"]["accuracy"]
    assert on_disk["per_lr"][0]["test_mean"] == pytest.approx(statistics.fmean(first))

    calls = []
    real = ft.finetune_cell
    monkeypatch.setattr(ft, "finetune_cell", lambda *a: calls.append(a[4:]) or real(*a))
    with open(tmp_path / "out" / "results.jsonl", "a") as f:
        f.write('{"key": "trunc')  # what a run killed mid-write leaves
    assert ft.main(argv)["per_lr"] == rep["per_lr"] and calls == []  # everything reused
    ft.main(argv + ["--seeds=3"])
    assert calls == [(1e-3, 2), (2e-3, 2)]  # only the new seed
    ft.main(argv + ["--pooling=last"])  # a different setting is a different experiment: all cells again
    assert len(calls) == 6


def test_same_cell_gives_same_result(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    train, test = sc_files(tmp_path)
    base = [f"--init_from={ckpt}", "--task=sc", f"--train={train}", f"--test={test}", "--lrs=1e-3", "--seeds=1",
            "--batch_size=8", "--max_steps=3", "--progress=False"]
    a = ft.main(base + [f"--out_dir={tmp_path}/a"])
    b = ft.main(base + [f"--out_dir={tmp_path}/b"])
    assert a["per_lr"] == b["per_lr"]


def test_experiment_summary_table_and_figures(tiny_data, tmp_path):
    """--summarize reads runs and their sweeps from disk: rows in the paper's order, one column per task, the chosen
    learning rate's mean ± 95% CI, the stability figure, and the two figures when matplotlib is there."""
    root = tmp_path / "exp"
    runs = {"mlm": dict(objective="mlm", switch_to="none"), "clm": dict(objective="clm", switch_to="none"),
            "half": dict(objective="clm", switch_to="mlm", switch_at=0.5),
            "clm-cpt": dict(init_from=root / "clm" / "ckpt.pt", objective="mlm", switch_to="none", max_steps=4)}
    for name, settings in runs.items():
        train.main(run_args(tiny_data, str(root / name), **settings))
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    early = ft.main([f"--summarize={root}"] + ([f"--figures={tmp_path / 'early'}"] if has_matplotlib else []))
    assert early["tasks"] == [] and early["tables"].splitlines()[0] == "| run | pretraining | mean |"
    if has_matplotlib:  # before any fine-tuning, the losses are the one figure to draw
        assert [os.path.basename(p) for p in early["figures"]] == ["experiment_losses.png"]
    sc_train, sc_test = sc_files(tmp_path)
    reports = {}
    for name in runs:
        reports[name] = ft.main([f"--init_from={root / name / 'ckpt.pt'}", "--task=sc", f"--train={sc_train}",
                                 f"--test={sc_test}", "--lrs=1e-3,4e-3", "--seeds=2", "--batch_size=8",
                                 "--max_steps=2", "--progress=False", f"--out_dir={root / name / 'sc'}"])
    figures = tmp_path / "figures"
    summary = ft.main([f"--summarize={root}"] + ([f"--figures={figures}"] if has_matplotlib else []))

    assert summary["runs"] == ["clm", "half", "mlm", "clm-cpt"]  # CLM share falling, then continued pretraining
    lines = summary["tables"].splitlines()
    assert lines[0] == "| run | pretraining | sc accuracy | mean |"
    rep = reports["half"]
    assert f"| half | CLM 4 -> MLM 4 | {rep['test_mean']:.2f} ± {rep['test_ci95']:.2f} | {rep['test_mean']:.2f} |" \
        in lines
    assert any(line.startswith("| clm-cpt | clm + MLM 4 |") for line in lines)
    last = read_log(str(root / "mlm"))[1][-1]
    assert f"| mlm | {reports['mlm']['stability_sd']:.2f} | {reports['mlm']['stability_sd']:.2f} | " \
           f"{last['val_clm']:.4f} | {last['val_mlm']:.4f} |" in lines
    assert (root / "summary.md").read_text() == summary["tables"] + "\n"
    if has_matplotlib:
        assert sorted(p.name for p in figures.iterdir()) == ["experiment_losses.png", "experiment_lr.png"]
        assert all(p.read_bytes()[:4] == b"\x89PNG" for p in figures.iterdir())

    # a sweep filed under the wrong run would put its scores in the wrong row
    shutil.copytree(root / "mlm" / "sc", root / "clm" / "sc_of_mlm")
    with pytest.raises(SystemExit, match="not this run's"):
        ft.main([f"--summarize={root}"])
    with pytest.raises(SystemExit, match="no run in"):
        ft.main([f"--summarize={tmp_path / 'empty'}"])
    with pytest.raises(SystemExit, match="--figures goes with --summarize"):
        ft.main(["--init_from=x.pt", "--figures=out"])


def test_hf_record_conversions():
    assert ft.convert_hf("sst2", {"sentence": "a gem .", "label": 1, "idx": 0}) == [{"text": "a gem .", "label": 1}]
    assert ft.convert_hf("mnli", {"premise": "P", "hypothesis": "H", "label": 2, "idx": 5}) == \
        [{"text": "P", "text_pair": "H", "label": 2}]
    assert ft.convert_hf("qqp", {"question1": "A?", "question2": "B?", "label": 0, "idx": 1})[0]["text_pair"] == "B?"
    names = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
    conll = {"id": "0", "tokens": ["EU", "rejects", "German", "call"], "pos_tags": [22, 42, 16, 21],
             "chunk_tags": [11, 21, 11, 12], "ner_tags": [3, 0, 7, 0]}
    assert ft.convert_hf("conll2003", conll, names) == [{"words": ["EU", "rejects", "German", "call"],
                                                         "tags": ["B-ORG", "O", "B-MISC", "O"]}]
    squad = {"id": "56be", "title": "Super_Bowl", "context": "Denver won.", "question": "Who won?",
             "answers": {"text": ["Denver"], "answer_start": [0]}}
    assert ft.convert_hf("squad", squad) == [{"id": "56be", "question": "Who won?", "context": "Denver won.",
                                              "answers": {"text": ["Denver"], "answer_start": [0]}}]
    v2 = squad | {"answers": {"text": [], "answer_start": []}}
    assert ft.convert_hf("squad_v2", v2)[0]["answers"] == {"text": [], "answer_start": []}
    marco = {"answers": ["x"], "query": "what is x", "query_id": 9, "query_type": "DESCRIPTION",
             "wellFormedAnswers": [], "passages": {"is_selected": [0, 1, 0], "passage_text": ["p0", "p1", "p2"],
                                                   "url": ["u0", "u1", "u2"]}}
    assert ft.convert_hf("msmarco", marco) == [{"query": "what is x", "document": "p0", "grade": 0},
                                               {"query": "what is x", "document": "p1", "grade": 1},
                                               {"query": "what is x", "document": "p2", "grade": 0}]
    marco["passages"]["is_selected"] = [0, 0, 0]
    assert ft.convert_hf("msmarco", marco) == []
    for task in ft.HF_TASKS:  # every converted record passes its family's checks
        family = ft.HF_TASKS[task][0]
        record = {"sc": {"text": "a", "label": 1}, "tc": {"words": ["EU"], "tags": ["B-ORG"]}, "qa": squad,
                  "ir": {"query": "q", "document": "d", "grade": 1}}[family]
        make_family(family, [record])


def error_of(argv):
    with pytest.raises(SystemExit) as e:
        ft.main(argv + ["--progress=False"])
    return str(e.value)


def test_bad_input_names_file_line_and_field(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    good = [{"text": "fine", "label": "a"}, {"text": "also fine", "label": "b"}]

    def run(train, test, task="sc"):
        return error_of([f"--init_from={ckpt}", f"--task={task}", f"--out_dir={tmp_path}/out",
                         f"--train={write_jsonl(tmp_path / 'train.jsonl', train)}",
                         f"--test={write_jsonl(tmp_path / 'test.jsonl', test)}"])
    message = run(good + [{"text": "no label"}], good)
    assert "train.jsonl, line 3" in message and "'label'" in message and "missing" in message
    message = run(good, good + [{"text": "x", "label": "c"}])
    assert "test.jsonl, line 3" in message and "'label'" in message and "'c'" in message
    pairs = [{"text": "p", "text_pair": "h", "label": 0}, {"text": "p2", "text_pair": "h2", "label": 1}]
    message = run(pairs, [{"text": "single", "label": 0}])
    assert "test.jsonl, line 1" in message and "'text_pair'" in message and "sentence-pair" in message
    assert "split is empty" in run(good, [])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok", "label": 1}\n{"text": oops}\n')
    bad = f"{tmp_path}/bad.jsonl"
    assert "bad.jsonl, line 2: invalid JSON" in error_of([f"--init_from={ckpt}", "--task=sc", f"--train={bad}",
                                                           f"--test={bad}"])
    message = run([{"words": ["a", "b"], "tags": ["O"]}] * 2, [{"words": ["a"], "tags": ["O"]}], task="tc")
    assert "train.jsonl, line 1" in message and "'tags'" in message
    message = run([{"words": ["a"], "tags": ["B-X"]}] * 2, [{"words": ["a"], "tags": ["B-Y"]}], task="tc")
    assert "test.jsonl, line 1" in message and "'tags' item 0" in message
    qa = [{"id": "1", "question": "q?", "context": "abc def", "answers": {"text": ["def"], "answer_start": [3]}}]
    message = run(qa, qa, task="qa")
    assert "train.jsonl, line 1" in message and "'answers'" in message and "answer_start=3" in message
    ir = [{"query": "q", "document": "d", "grade": "high"}]
    assert "'grade'" in run(ir * 2, ir, task="ir")


def test_bad_checkpoint_and_settings(tmp_path):
    torch.save({"model": {}}, tmp_path / "other.pt")
    message = error_of([f"--init_from={tmp_path}/other.pt", "--task=demo_sc"])
    assert "other.pt" in message and "not a checkpoint of this project" in message
    assert "unknown setting 'lr'" in error_of(["--lr=1e-3"])
    assert "--seeds must be of type int" in error_of(["--seeds=many"])
    assert "--init_from" in error_of(["--task=demo_sc"])
    assert "--task must be one of" in error_of(["--init_from=x.pt", "--task=glue"])
    assert "--lrs must be" in error_of(["--init_from=x.pt", "--lrs=1e-3,fast"])


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit):
        train.configure(ft.FinetuneConfig, ["--help"])
    out = capsys.readouterr().out
    assert all(f"--{f.name}=" in out for f in dataclasses.fields(ft.FinetuneConfig))
    assert "learning-rate grid" in out


# # The offline demo tasks: real docstrings, real labels


@pytest.fixture(scope="module")
def demo():
    return {family: ft.demo_task(family) for family in ft.FAMILIES}


def test_demo_tasks_are_real_and_non_trivial(demo):
    for family, (train_records, test_records) in demo.items():
        assert len(train_records) > 3 * len(test_records) / 2 > 50, family
        built, _ = make_family(family, train_records, max_len=128, doc_stride=16)  # every record passes the checks
        built.check(rows(test_records))
    labels = [r["label"] for r in demo["sc"][1]]
    assert set(labels) == {"stdlib", "numpy", "torch"} and max(map(labels.count, set(labels))) / len(labels) < 0.7
    tags = {t for r in demo["tc"][0] for t in r["tags"]}
    assert {"O", "B-LIT", "I-LIT", "B-REF"} <= tags
    qa_train, qa_test = demo["qa"]
    unanswerable = sum(not r["answers"]["text"] for r in qa_test)
    assert 0 < unanswerable < len(qa_test) / 2
    contexts = lambda records: {r["context"] for r in records}  # noqa: E731
    assert not contexts(qa_train) & contexts(qa_test)  # split by docstring: none in both
    ir_train, ir_test = demo["ir"]
    assert len({r["document"] for r in ir_test}) == len(ir_test)
    assert not {r["query"] for r in ir_train} & {r["query"] for r in ir_test}


def test_demo_task_end_to_end(tmp_path, demo, monkeypatch):
    asked = []
    monkeypatch.setattr(ft, "demo_task", lambda family, data_dir: asked.append(data_dir) or demo[family])
    ckpt = make_checkpoint(tmp_path / "ckpt.pt", block_size=64)
    args = ["--task=demo_sc", f"--out_dir={tmp_path}/out", "--lrs=1e-3", "--seeds=1", "--max_steps=2",
            "--batch_size=8", "--progress=False"]
    rep = ft.main([f"--init_from={ckpt}", *args])
    assert rep["family"] == "sc" and 0 <= rep["test_mean"] <= 100 and 50 < rep["trivial"]["test"] < 70
    # a train.py checkpoint names its pretraining data: the demo tasks look there for the held-out docstrings
    saved = torch.load(ckpt, weights_only=False)
    saved["train_config"] = {"data": "docstrings", "tokenizer": "cl100k_8k", "data_dir": ""}
    torch.save(saved, tmp_path / "trained.pt")
    ft.main([f"--init_from={tmp_path}/trained.pt", *args])
    assert asked == ["", os.path.join("data", "docstrings_cl100k_8k")]


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face checkpoints in and out (model.load_hf / export_hf, data.get_tokenizer("hf:...")), and FSDP.
# Everything is built locally (tiny random Llamas, a BPE trained on a few KB): nothing is downloaded.

TRAIN_TEXT = open(textwrap.__file__, encoding="utf-8").read()[:12000] + " naïve café 東京 Ünïcödé 12345 3.14 🙂"
SAMPLE = ("Hello world! naïve café, 東京 and Ünïcödé 🙂🙂.\n\n    def f(x):\n\treturn x ** 2  # squared\n"
          "Numbers: 1234567 3.14159 1,000,000 and 0xFF. don't I'LL we've   spaces   \t\t tabs\r\n\n\n  end 42"
          "  trailing   ")
LLAMA3_REGEX = data.LLAMA3_PATTERN
try:  # optional: the tests that compare with the Hugging Face libraries themselves skip without them
    import tokenizers
    import transformers
except ImportError:
    tokenizers = transformers = None
needs_hf = pytest.mark.skipif(transformers is None or tokenizers is None,
                              reason="needs the Hugging Face libraries: pip install transformers tokenizers")


def train_bpe(path, pre_tokenizer):
    """A 300-token byte-level BPE trained by the tokenizers library, written as path/tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizer
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([TRAIN_TEXT], trainer)
    os.makedirs(path, exist_ok=True)
    tk.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    return tk


def llama3_pre():
    from tokenizers import Regex, pre_tokenizers
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def make_llama(path, tie=False, rope_scaling=None, shard=False, **overrides):
    """A tiny random LlamaForCausalLM with a trained tokenizer, saved like a Hub checkpoint."""
    tk = train_bpe(path, llama3_pre())
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tk.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, rope_theta=500000.0, tie_word_embeddings=tie,
                                      rope_scaling=rope_scaling, eos_token_id=0, **overrides)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # RMSNorm gains are ones at init: randomise them so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, max_shard_size="20KB" if shard else "5GB")
    return model


def ours(path):
    tok = data.get_tokenizer("hf:" + str(path))
    return M.load_hf(str(path), tok).eval(), tok


def hf_logits(model, ids, causal=True):
    B, T = ids.shape
    # Bidirectional in transformers: a 4D boolean mask (B, 1, T, T), True where a query may attend, replaces the
    # causal mask it would otherwise build (transformers 5.24; checked below against causal=False).
    mask = None if causal else torch.ones(B, 1, T, T, dtype=torch.bool)
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}


@needs_hf
@pytest.mark.parametrize("tie,scaling", [(False, None), (True, None), (False, LLAMA3_SCALING)])
def test_import_matches_transformers(tmp_path, tie, scaling):
    ref = make_llama(tmp_path, tie=tie, rope_scaling=scaling)
    model, tok = ours(tmp_path)
    V = ref.config.vocab_size
    assert tok.base_vocab == V and tok.n_vocab == V + 2  # <|mask|> and <|pad|> added (see the next test)
    ids = torch.tensor([tok.encode(SAMPLE)[:48]] * 2)
    with torch.no_grad():
        for causal in (True, False):
            got = model.logits(model(ids, causal=causal))[..., :V]
            torch.testing.assert_close(got, hf_logits(ref, ids, causal), atol=2e-5, rtol=1e-4)
    assert model.config.tie_embeddings == tie and (model.lm_head.weight is model.embed.weight) == tie
    assert (model.config.rope_scaling is not None) == (scaling is not None)


@needs_hf
def test_added_tokens_and_padding_rows(tmp_path):
    make_llama(tmp_path)
    model, tok = ours(tmp_path)
    names = tok.encoding._special_tokens
    V = tok.base_vocab
    # eos from tokenizer_config.json; no mask and no pad distinct from eos in the checkpoint: both added after it
    assert (tok.eot_id, tok.mask_id) == (names["<|endoftext|>"], V)
    assert tok.pad_id == V + 1 and tok.n_vocab == V + 2
    assert model.embed.weight.shape[0] == model.config.padded_vocab_size >= V + 2
    mean = model.embed.weight[:V].mean(0)
    torch.testing.assert_close(model.embed.weight[V:], mean.expand(model.embed.weight.shape[0] - V, -1))
    assert tok.meta()["digest"] and tok.meta()["n_vocab"] == V + 2


@needs_hf
def test_sharded_checkpoint_loads(tmp_path):
    ref = make_llama(tmp_path, shard=True)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    model, tok = ours(tmp_path)
    ids = torch.tensor([tok.encode(SAMPLE)[:32]])
    with torch.no_grad():
        got = model.logits(model(ids))[..., :ref.config.vocab_size]
    torch.testing.assert_close(got, hf_logits(ref, ids), atol=2e-5, rtol=1e-4)


@needs_hf
@pytest.mark.parametrize("tie", [False, True])
def test_export_round_trip(tmp_path, tie):
    make_llama(tmp_path / "src", tie=tie, rope_scaling=LLAMA3_SCALING)
    model, tok = ours(tmp_path / "src")
    torch.save(checkpoint_payload(model, tokenizer=tok.meta()), tmp_path / "ckpt.pt")
    out = M.export_hf(str(tmp_path / "ckpt.pt"), str(tmp_path / "hf"))
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == "LlamaForCausalLM" and back.config.vocab_size == tok.n_vocab
    ids = torch.tensor([tok.encode(SAMPLE)[:40] + [tok.mask_id, tok.pad_id]])
    with torch.no_grad():
        for causal in (True, False):
            ref = model.logits(model(ids, causal=causal))[..., :tok.n_vocab]
            torch.testing.assert_close(hf_logits(back, ids, causal), ref, atol=2e-5, rtol=1e-4)
    fast = transformers.AutoTokenizer.from_pretrained(out)
    assert fast(SAMPLE, add_special_tokens=False)["input_ids"] == tok.encode(SAMPLE)
    assert fast.mask_token_id == tok.mask_id and fast.eos_token_id == tok.eot_id
    # and back in again: the exported directory is itself an hf: checkpoint with the same tokenizer
    again, tok2 = ours(out)
    assert tok2.encode(SAMPLE) == tok.encode(SAMPLE) and tok2.mask_id == tok.mask_id and tok2.n_vocab == tok.n_vocab


@needs_hf
@pytest.mark.parametrize("style", ["llama3", "gpt2", "digits"])
def test_tokenizer_matches_tokenizers_library(tmp_path, style):
    from tokenizers import pre_tokenizers
    pre = {"llama3": llama3_pre(), "gpt2": pre_tokenizers.ByteLevel(add_prefix_space=False),
           "digits": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                              pre_tokenizers.ByteLevel(add_prefix_space=False)])}[style]
    tk = train_bpe(tmp_path, pre)
    tok = data.get_tokenizer(f"hf:{tmp_path}")
    texts = [SAMPLE, TRAIN_TEXT[:3000], "x  1  2\n 3", " 007 agent", "a\u00a0b\u2003c", "İstanbul ǅ ÅÆ"]
    for text in texts:
        assert tok.encode(text) == tk.encode(text, add_special_tokens=False).ids, text[:40]
        assert tok.decode(tok.encode(text)) == text


@needs_hf
def test_cl100k_tokenizer_json_matches_tiktoken(tmp_path):
    tok = data.get_tokenizer("cl100k_8k")
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data.tokenizer_json(tok)))
    tk = tokenizers.Tokenizer.from_file(str(path))
    for text in (SAMPLE, TRAIN_TEXT[:4000]):
        assert tk.encode(text, add_special_tokens=False).ids == tok.encode(text)
    assert tk.token_to_id("<|mask|>") == tok.mask_id


@needs_hf
def test_tiktoken_format_tokenizer_model(tmp_path):
    import base64
    train_bpe(tmp_path / "json", llama3_pre())
    reference = data.get_tokenizer(f"hf:{tmp_path / 'json'}")
    os.makedirs(tmp_path / "tt")
    with open(tmp_path / "tt" / "tokenizer.model", "w") as f:
        for token, rank in reference.encoding._mergeable_ranks.items():
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    with open(tmp_path / "tt" / "tokenizer_config.json", "w") as f:
        json.dump({"eos_token": "<|endoftext|>",
                   "added_tokens_decoder": {"0": {"content": "<|endoftext|>", "special": True}}}, f)
    tok = data.get_tokenizer(f"hf:{tmp_path / 'tt'}")
    assert tok.encode(SAMPLE) == reference.encode(SAMPLE) and tok.meta()["digest"] == reference.meta()["digest"]


@needs_hf
def test_bad_inputs_name_the_file(tmp_path):
    tok = None
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        M.load_hf(str(tmp_path), tok)
    make_llama(tmp_path / "m")
    tok = data.get_tokenizer(f"hf:{tmp_path / 'm'}")
    config = json.loads((tmp_path / "m" / "config.json").read_text())

    def with_config(**changes):
        d = tmp_path / f"bad{len(os.listdir(tmp_path))}"
        shutil.copytree(tmp_path / "m", d)
        (d / "config.json").write_text(json.dumps({**config, **changes}))
        return str(d)

    with pytest.raises(ValueError, match=r"config\.json: .*attention_bias=true"):
        M.load_hf(with_config(attention_bias=True), tok)
    with pytest.raises(ValueError, match=r"sliding_window=4096"):
        M.load_hf(with_config(model_type="mistral", sliding_window=4096), tok)
    with pytest.raises(ValueError, match=r"model_type 'gpt2'.*hidden_act 'gelu'"):
        M.load_hf(with_config(model_type="gpt2", hidden_act="gelu"), tok)
    with pytest.raises(ValueError, match=r"head_dim 8 != hidden_size"):
        M.load_hf(with_config(head_dim=8), tok)
    with pytest.raises(ValueError, match=r"rope type 'yarn'"):
        M.load_hf(with_config(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}), tok)
    with pytest.raises(ValueError, match=r"config\.json: vocab_size 999.*same checkpoint"):
        M.load_hf(with_config(vocab_size=999), tok)
    # a missing and a truncated shard
    make_llama(tmp_path / "sh", shard=True)
    shards = sorted(f for f in os.listdir(tmp_path / "sh") if f.endswith(".safetensors"))
    os.remove(tmp_path / "sh" / shards[0])
    with pytest.raises(FileNotFoundError, match=f"index.json lists shards.*{shards[0]}"):
        M.read_weights(str(tmp_path / "sh"))
    make_llama(tmp_path / "tr", shard=True)
    victim = tmp_path / "tr" / shards[1]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{shards[1]}: unreadable safetensors"):
        M.read_weights(str(tmp_path / "tr"))
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram"}, "normalizer": None}))
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a byte-level BPE"):
        data.get_tokenizer(f"hf:{tmp_path / 'sp'}")


# train.py end to end: continued pretraining from an hf: checkpoint, export, FSDP


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfrun")
    make_llama(root / "llama")
    for i in range(30):
        (root / f"doc{i:02d}.txt").write_text(TRAIN_TEXT[i * 350:(i + 1) * 350] + " " + SAMPLE)
    name = f"hf:{root / 'llama'}"
    data.prepare(str(root / "*.txt"), str(root / "data"), name)
    return root, name


def hf_run_args(data_dir, out_dir, **overrides):
    settings = dict(data_dir=data_dir, out_dir=out_dir, block_size=32, batch_size=2, max_steps=6, warmup_steps=2,
                    decay_steps=2, objective="mlm", switch_to="none", eval_interval=3, eval_batches=2, lr=1e-3,
                    progress=False) | overrides
    return [f"--{k}={v}" for k, v in settings.items()]


@needs_hf
def test_train_from_hf_then_export(hf_run, tmp_path):
    root, name = hf_run
    with pytest.raises(SystemExit, match="add --tokenizer=hf:"):
        train.main(hf_run_args(str(root / "data"), str(tmp_path), init_from=name))
    train.main(hf_run_args(str(root / "data"), str(tmp_path), init_from=name, tokenizer=name))
    losses = [r["loss"] for r in read_log(tmp_path)[0]]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    train.main([f"--out_dir={tmp_path}", "--export=hf"])
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert back.config.vocab_size == data.get_tokenizer(name).n_vocab


def torchrun(args, nproc):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
    result = subprocess.run(cmd + args, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@needs_hf
def test_fsdp_matches_single_process_and_resumes(hf_run, tmp_path):
    root, name = hf_run
    common = dict(init_from=name, tokenizer=name, batch_size=1, total_batch_size=4, compile="false")
    train.main(hf_run_args(str(root / "data"), str(tmp_path / "one"), **common))
    torchrun(hf_run_args(str(root / "data"), str(tmp_path / "fsdp"), fsdp="true", stop_at=3, **common), 2)
    torchrun(hf_run_args(str(root / "data"), str(tmp_path / "fsdp"), **{**common, "init_from": "resume"}), 2)
    one, two = read_log(tmp_path / "one")[0], read_log(tmp_path / "fsdp")[0]
    assert [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    ckpt = torch.load(tmp_path / "fsdp" / "ckpt.pt", weights_only=True)
    assert all(not hasattr(v, "full_tensor") for v in ckpt["model"].values())  # full tensors, not shards


@needs_hf
def test_finetune_starts_from_an_hf_decoder(tmp_path):
    """finetune.py --init_from=hf:DIR fine-tunes a Hugging Face decoder as it is, with its own tokenizer."""
    make_llama(tmp_path / "llama")
    records = [{"text": f"{SAMPLE[:20]} {word}", "label": word} for word in ["good", "bad"] * 20]
    train_file = write_jsonl(tmp_path / "train.jsonl", records)
    test_file = write_jsonl(tmp_path / "test.jsonl", records[:8])
    rep = ft.main([f"--init_from=hf:{tmp_path / 'llama'}", "--task=sc", f"--train={train_file}", f"--test={test_file}",
                   "--lrs=1e-3", "--seeds=1", "--max_steps=2", "--batch_size=8", "--max_len=32",
                   f"--out_dir={tmp_path / 'ft'}", "--progress=False"])
    assert rep["chosen_lr"] == 1e-3 and 0 <= rep["per_lr"][0]["test_mean"] <= 100


def test_loader_rejects_ids_past_the_vocabulary(tmp_path):
    """On accelerators objectives.py skips its range check (a host sync); the loader's host-side check covers it."""
    meta = get_tokenizer("cl100k_8k").meta()
    data.write_tokens(str(tmp_path), {"train": np.full(64, meta["n_vocab"]), "val": np.zeros(64)}, meta, "synthetic")
    with pytest.raises(ValueError, match="holds token id 8195 but its tokenizer has 8195 ids"):
        BlockLoader(str(tmp_path), "train", 16, 2).next_batch()


# ---------------------------------------------------------------------------------------------------------------
# Faults and bad input: nothing executed, nothing lost, every error names its cause

def train_in_subprocess(args, crash_at_step=None, timeout=120):
    """train.py in its own process; crash_at_step=N: the process dies (os._exit, no cleanup, no buffers flushed,
    like kill -9) when step N starts."""
    crash = "" if crash_at_step is None else textwrap.dedent(f"""
        real = train.train_step
        def train_step(*a, **k):
            if a[5] == {crash_at_step}:
                os._exit(9)
            return real(*a, **k)
        train.train_step = train_step
        """)
    code = f"import os, sys, train\n{crash}\ntrain.main(sys.argv[1:])\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=HERE,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))


def strict_json_lines(path):
    def reject(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")
    with open(path) as f:
        return [json.loads(line, parse_constant=reject) for line in f]


def test_summarize_never_unpickles_code(tmp_path):
    class Payload:  # what a hostile checkpoint carries: unpickling it would create `marker`
        def __reduce__(self):
            return os.mkdir, (str(tmp_path / "marker"),)
    (tmp_path / "exp" / "run").mkdir(parents=True)
    torch.save({"format": M.CHECKPOINT_FORMAT, "train_config": {}, "x": Payload()}, tmp_path / "exp/run/ckpt.pt")
    (tmp_path / "exp/run/log.jsonl").write_text("")
    message = error_of([f"--summarize={tmp_path / 'exp'}"])
    assert "ckpt.pt holds Python objects" in message and "not loaded" in message
    assert not (tmp_path / "marker").exists()


def test_a_non_finite_gradient_is_never_applied_nor_saved(tiny_data, tmp_path):
    """lr=1e9: step 2's loss is finite but its gradient is not. That update must not be applied, no checkpoint may
    hold a NaN, and the message names the real last good checkpoint, or says there is none."""
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        train.main(run_args(tiny_data, out, lr=1e9, max_steps=20, eval_interval=2))
    assert "gradient norm nan" in str(e.value) and "No checkpoint of this run was written yet" in str(e.value)
    assert not os.path.exists(os.path.join(out, "ckpt.pt"))
    train.main(run_args(tiny_data, out, max_steps=20, eval_interval=2, stop_at=2))
    with pytest.raises(SystemExit) as e:
        train.main(run_args(tiny_data, out, init_from="resume", lr=1e9))
    assert f"last good checkpoint is {out}/ckpt.pt (step 2)" in str(e.value)
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 2 and train.first_non_finite(ckpt) is None
    strict_json_lines(os.path.join(out, "log.jsonl"))


def test_a_non_finite_checkpoint_is_refused_and_the_old_one_kept(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    train.save_checkpoint({"step": 1, "model": {"w": torch.ones(3)}}, path)
    with pytest.raises(FloatingPointError, match=r"model\.w holds non-finite values at step 2"):
        train.save_checkpoint({"step": 2, "model": {"w": torch.tensor([1.0, float("inf"), 0.0])}}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert train.first_non_finite({"optimizer": {"state": {0: {"exp_avg": torch.tensor([float("nan")])}}}}) \
        == "optimizer.state.0.exp_avg"


def test_finetuning_stops_before_a_non_finite_update(tmp_path):
    """A loss that is finite with a NaN gradient (sqrt at 0 in the backward pass) from step 2 on: the cell is flagged
    as diverged at step 2 and scored with the weights of step 2, which are finite."""
    family, cfg = make_family("sc", [{"text": f"text {i}", "label": i % 2} for i in range(64)], batch_size=8,
                              max_steps=6)
    real, calls = family.loss, []

    def loss(body, head, batch):
        calls.append(1)
        value = real(body, head, batch)
        w = head.weight
        return value + ((w - w.detach()).pow(2).sum().sqrt() if len(calls) > 2 else 0)
    family.loss = loss
    body = tiny_body()
    splits = {"train": family.encode(rows([{"text": f"text {i}", "label": i % 2} for i in range(64)])),
              "test": family.encode(rows([{"text": "text 1", "label": 1}]))}
    result = ft.finetune_cell(family, body, splits, cfg, 1e-3, seed=0)
    assert result["diverged_at"] == 2 and math.isfinite(result["test"]["accuracy"])
    assert all(torch.isfinite(p).all() and p.grad is None for p in body.parameters())


def test_resume_rewrites_the_log_atomically_and_drops_a_torn_line(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    train.main(run_args(tiny_data, out, stop_at=4))
    log = os.path.join(out, "log.jsonl")
    kept = open(log).read()
    # The process dies as the first resumed step starts: on main, the log was truncated and its lines buffered.
    died = train_in_subprocess(run_args(tiny_data, out, init_from="resume"), crash_at_step=4)
    assert died.returncode == 9 and open(log).read() == kept
    with open(log, "a") as f:
        f.write('{"step": 5, "objective": "ml')  # a crash in the middle of a write
    train.main(run_args(tiny_data, out, init_from="resume"))
    steps, evals = read_log(out)
    assert [r["step"] for r in steps] == list(range(1, 9)) and [e["step"] for e in evals] == [0, 4, 8]


def test_a_restart_after_a_crash_before_the_first_checkpoint_logs_step_0_once(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    assert train_in_subprocess(run_args(tiny_data, out), crash_at_step=1).returncode == 9
    train.main(run_args(tiny_data, out))
    assert [e["step"] for e in read_log(out)[1]] == [0, 4, 8]


def test_log_is_strict_json_when_a_figure_is_not_finite(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "peak_flops", lambda device: float("nan"))  # an unknown GPU: MFU is NaN
    out = str(tmp_path / "run")
    train.main(run_args(tiny_data, out, max_steps=2, switch_at=1, warmup_steps=1, decay_steps=1))
    records = strict_json_lines(os.path.join(out, "log.jsonl"))
    assert [r["mfu"] for r in records if "mfu" in r] == [None, None]


def test_one_run_per_out_dir_and_a_crashed_run_leaves_no_stuck_lock(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    with files.exclusive(os.path.join(out, ".lock"), "a test"):
        with pytest.raises(SystemExit, match=f"process {os.getpid()} is already working there"):
            train.main(run_args(tiny_data, out))
    assert not os.path.exists(os.path.join(out, "log.jsonl"))  # the refused run touched nothing
    assert train_in_subprocess(run_args(tiny_data, out), crash_at_step=1).returncode == 9
    train.main(run_args(tiny_data, out))  # the lock died with its process
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    train_file, test_file = sc_files(tmp_path)
    with files.exclusive(str(tmp_path / "ft" / ".lock"), "a test"):
        assert "already working there" in error_of([f"--init_from={ckpt}", "--task=sc", f"--train={train_file}",
                                                    f"--test={test_file}", f"--out_dir={tmp_path / 'ft'}"])


def test_two_preparations_of_one_directory_run_one_after_the_other(tmp_path, capsys):
    """Another process is preparing the directory (held at its tokenizer until told to go on); a prepare(reuse=True)
    started meanwhile waits for it, then reuses its files instead of writing the same files at the same time."""
    import threading
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(50)))
    out, source = str(tmp_path / "data"), str(tmp_path / "c.jsonl")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, data
        real = data._write_token_files
        def held(*args):
            print("held", flush=True)
            sys.stdin.readline()
            return real(*args)
        data._write_token_files = held
        data.prepare({source!r}, {out!r}, "cl100k_8k", val_fraction=0.2)
        """)], cwd=HERE, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().startswith("preparing ") and holder.stdout.readline() == "held\n"
    result = {}
    waiting = threading.Thread(target=lambda: result.update(meta=prepare(source, out, val_fraction=0.2, reuse=True)))
    waiting.start()
    for _ in range(600):
        if "waiting for process" in capsys.readouterr().err:
            break
        waiting.join(0.1)
    else:
        pytest.fail("prepare did not wait for the process preparing the directory")
    holder.stdin.write("go\n")
    holder.stdin.flush()
    waiting.join(60)
    assert holder.wait(timeout=60) == 0
    assert result["meta"] == load_meta(out) and sum(result["meta"]["n_documents"].values()) == 50
    assert "preparing" not in capsys.readouterr().out  # reused, not prepared a second time
    assert not any(name.endswith(".tmp") for name in os.listdir(out))


@pytest.mark.parametrize("argv, message", [
    (["--grad_clip=-1"], "grad_clip must be >= 0"),
    (["--lr=inf"], "lr must be a finite number"),
    (["--switch_at=0.001", "--max_steps=40", "--decay_steps=4"], "switch_at=0.001 puts the switch at step 0 of 40"),
    (["--switch_at=0.99", "--max_steps=40", "--decay_steps=4"], "switch_at=0.99 puts the switch at step 40 of 40"),
    (["--eval_batches=0"], "eval_batches must be >= 1"),
])
def test_settings_that_would_silently_do_the_wrong_thing(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        train.main(argv + [f"--out_dir={tmp_path}"])
    if "grad_clip" in message:
        assert "grad_clip must be >= 0" in error_of(["--init_from=x.pt", "--grad_clip=-1"])


def test_meta_json_is_checked_against_the_tokenizer(tiny_data, tmp_path):
    edited = tmp_path / "data"
    shutil.copytree(tiny_data, edited)
    meta = json.loads((edited / "meta.json").read_text())
    (edited / "meta.json").write_text(json.dumps({**meta, "n_vocab": 9000}))
    with pytest.raises(SystemExit, match=r"meta.json does not match the tokenizer of --tokenizer=cl100k_8k "
                                         r"\(n_vocab 9000 against 8195\)"):
        train.main(run_args(str(edited), str(tmp_path / "run")))
    (edited / "meta.json").write_text('{"tokenizer": "cl100k_8k", ')
    with pytest.raises(SystemExit, match="meta.json is not valid JSON"):
        train.main(run_args(str(edited), str(tmp_path / "run")))
    (edited / "meta.json").write_text(json.dumps({**meta, "mask_id": "8193"}))
    with pytest.raises(SystemExit, match="meta.json: field 'mask_id' must be a token id"):
        train.main(run_args(str(edited), str(tmp_path / "run")))


def test_config_file_errors_name_the_file_and_line(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("lr = 1e-3\nmax_steps = = 5\n")
    with pytest.raises(SystemExit, match=r"broken.py, line 2: invalid syntax"):
        train.main([str(broken)])
    failing = tmp_path / "failing.py"
    failing.write_text("lr = 1e-3\n\nmax_steps = steps * 2\n")
    with pytest.raises(SystemExit, match=r"failing.py, line 3: NameError: name 'steps' is not defined"):
        train.main([str(failing)])


def test_text_that_is_not_utf8_is_named_with_its_line(tmp_path):
    (tmp_path / "a.txt").write_bytes("first line\ncaf\xe9 in latin-1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"a.txt, line 2: not UTF-8 text \(byte 0xe9\)"):
        prepare(str(tmp_path / "a.txt"), str(tmp_path / "out"))
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"b.jsonl, line 2: not UTF-8 text \(byte 0xe9"):
        prepare(str(tmp_path / "b.jsonl"), str(tmp_path / "out"))
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    (tmp_path / "train.jsonl").write_bytes(b'{"text": "fine", "label": 1}\n{"text": "caf\xe9", "label": 0}\n')
    assert "train.jsonl, line 2: not UTF-8 text" in error_of([f"--init_from={ckpt}", "--task=sc",
                                                              f"--train={tmp_path}/train.jsonl",
                                                              f"--test={tmp_path}/train.jsonl"])


def one_line_error(command, args, cwd):
    result = subprocess.run([sys.executable, os.path.join(HERE, command), *args], capture_output=True, text=True,
                            cwd=cwd, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_bad_files_stop_with_one_line_that_names_them(tiny_data, tmp_path):
    assert "--max_tokens must be of type int, got 'abc'" in one_line_error("data.py", ["--max_tokens=abc"], tmp_path)
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    good = tmp_path / "good" / "ckpt.pt"
    train.main(run_args(tiny_data, str(good.parent), max_steps=2, switch_at=1, warmup_steps=1, decay_steps=1))
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:5000])
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    for name, message in [("notes.txt", "is not a complete PyTorch checkpoint"),
                          ("truncated.pt", "is not a complete PyTorch checkpoint"),
                          ("foreign.pt", "is not a checkpoint of this project")]:
        line = one_line_error("train.py", run_args(tiny_data, str(tmp_path / name[:-3]),
                                                   init_from=tmp_path / name), tmp_path)
        assert f"{tmp_path / name} {message}" in line
    line = one_line_error("train.py", run_args(tiny_data, str(tmp_path / "never"), init_from="resume"), tmp_path)
    assert f"there is no {tmp_path / 'never' / 'ckpt.pt'} to resume" in line


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tiny_data, tmp_path):
    """/dev/full answers every write with ENOSPC, as a full disk does: the checkpoint write fails, the message says
    so with the path, no temporary file is left behind, and the previous checkpoint still loads."""
    out = tmp_path / "run"
    train.main(run_args(tiny_data, str(out), stop_at=4))
    os.symlink("/dev/full", out / "ckpt.pt.tmp")  # where the next checkpoint is written first
    with pytest.raises(SystemExit, match=f"could not write {out / 'ckpt.pt'}.*the previous version of the file"):
        train.main(run_args(tiny_data, str(out), init_from="resume"))
    assert not os.path.lexists(out / "ckpt.pt.tmp")
    assert model.load_checkpoint(str(out / "ckpt.pt"))[1]["step"] == 4
