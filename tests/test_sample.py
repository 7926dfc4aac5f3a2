"""
sample.py: fill-mask with bidirectional attention, continuation with causal attention, and several
checkpoints compared on the same masks, on tiny random checkpoints with the project's tokenizer.
Nothing here needs transformers (the comparison with its fill-mask pipeline is in
test_hf_export.py).
"""

import json

import pytest
import torch

from mlm_vs_clm import checkpoints
from mlm_vs_clm import export
import model as M
import sample
from tests.helpers import TOK, make_checkpoint
from objectives import IGNORE, mask_tokens, pretraining_loss
from mlm_vs_clm.tokenizer import get_tokenizer

TEXT = "Return a new list of the items in the sequence, sorted by their key."

def checkpoint_in(directory, seed=0):
    directory.mkdir(parents=True)
    return make_checkpoint(directory / "ckpt.pt", seed=seed)

@pytest.fixture
def ckpt(tmp_path):
    return checkpoint_in(tmp_path / "a")

def model_of(path):
    model = checkpoints.load_model(path).model
    return model.eval()

def run(capsys, *args):
    out = sample.main(list(args))
    return out, capsys.readouterr().out

def test_fill_mask_is_the_bidirectional_softmax_at_each_mask(ckpt, capsys):
    text = "The value of <|mask|> is returned by\n<|mask|>."
    out, printed = run(capsys, f"--init_from={ckpt}", "--show=fill", f"--text={text}",
                       "--top_k=4")
    # the spaces before a mask go with it (the exported tokenizer.json's lstrip)
    ids = TOK.encode("The value of") + [TOK.mask_id] + TOK.encode(" is returned by") + \
        [TOK.mask_id] + TOK.encode(".")
    model = model_of(ckpt)
    with torch.no_grad():
        logits = model.logits(model(torch.tensor([ids]), causal=False))[0]
    positions = [i for i, t in enumerate(ids) if t == TOK.mask_id]
    predictions = out["fill"]["a"]
    assert len(predictions) == 2 and all(len(p) == 4 for p in predictions)
    for position, got in zip(positions, predictions):
        probs = logits[position, :TOK.n_vocab].softmax(-1)  # not the padding rows beyond
        best = probs.topk(4)
        assert [i for i, _ in got] == best.indices.tolist()
        torch.testing.assert_close(torch.tensor([p for _, p in got]), best.values)
    assert "mask 2, after" in printed and "bidirectional" in printed

def test_mask_ratio_masks_as_pretraining_does(ckpt, capsys):
    out, printed = run(capsys, f"--init_from={ckpt}", "--show=fill", f"--text={TEXT}",
                       "--mask_ratio=0.4", "--seed=3", "--top_k=1")
    inputs, labels = mask_tokens(torch.tensor([TOK.encode(TEXT)]), TOK.vocab(), 0.4,
                                 generator=torch.Generator().manual_seed(3))
    assert len(out["fill"]["a"]) == int((labels != IGNORE).sum()) > 0
    assert repr(TOK.decode(inputs[0])) in printed and "truth" in printed

def greedy(model, ids, n):
    ids = list(ids)
    for _ in range(n):
        with torch.no_grad():
            logits = model.logits(model(torch.tensor([ids]), causal=True))[0, -1, :TOK.n_vocab]
        logits[[TOK.mask_id, TOK.pad_id]] = float("-inf")
        ids.append(int(logits.argmax()))
    return ids

def test_continuation_greedy_sampled_and_bounded_by_the_context(ckpt, capsys):
    prompt = "Return the number of"
    out, _ = run(capsys, f"--init_from={ckpt}", "--show=continue", f"--prompt={prompt}",
                 "--max_new_tokens=6")
    model, ids = model_of(ckpt), TOK.encode(prompt)
    new = out["continue"]["a"]
    # a random model may hit end-of-text early; greedy is greedy up to there
    assert new == greedy(model, ids, len(new))[len(ids):] and len(new) <= 6
    sampled = [sample.main([f"--init_from={ckpt}", "--show=continue", f"--prompt={prompt}",
                            "--temperature=1.5", "--sample_top_k=0", f"--seed={s}",
                            "--max_new_tokens=8"])["continue"]["a"] for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]  # the seed decides
    # never past block_size (64): a 60-token prompt gets at most 4 new tokens
    long_prompt = " ".join(["items"] * 60)
    assert len(TOK.encode(long_prompt)) == 60
    cfg = sample.SampleConfig(max_new_tokens=20)
    new, why = sample.continuation(model, TOK, TOK.encode(long_prompt), cfg)
    assert len(new) <= 4 and (len(new) == 4) == ("context" in why)

def test_continuation_stops_at_end_of_text(ckpt):
    model = model_of(ckpt)
    eot = torch.nn.functional.one_hot(torch.tensor(TOK.eot_id), model.config.padded_vocab_size)
    model.logits = lambda hidden: eot.float().expand(*hidden.shape[:-1], -1)  # always end-of-text
    new, why = sample.continuation(model, TOK, TOK.encode("hello"), sample.SampleConfig())
    assert new == [] and why == "end-of-text"

def test_losses_use_the_same_masks_for_every_model(tmp_path, capsys):
    a, b = checkpoint_in(tmp_path / "clm", seed=0), checkpoint_in(tmp_path / "mlm", seed=1)
    out, printed = run(capsys, f"--init_from={a},{b}", f"--loss_text={TEXT}", "--seed=5",
                       "--text=It returns <|mask|>.", "--max_new_tokens=3")
    ids = torch.tensor([TOK.encode(TEXT)])
    vocab = TOK.vocab()
    for name, path in (("clm", a), ("mlm", b)):
        model = model_of(path)
        with torch.no_grad():
            clm, _ = pretraining_loss(model, ids, "clm", vocab)
            mlm, _ = pretraining_loss(model, ids, "mlm", vocab, mask_ratio=0.4,
                                      generator=torch.Generator().manual_seed(5))
        assert out["loss"][name] == pytest.approx((float(clm), float(mlm)), rel=1e-5)
    assert set(out["fill"]) == set(out["continue"]) == {"clm", "mlm"}
    assert "clm loss" in printed and "the same masks for every model" in printed

def test_hf_directory_gives_the_same_results(ckpt, tmp_path, capsys):
    """An exported encoder directory (written without transformers) read back with hf:DIR, side by
    side with its checkpoint: another tokenizer name, the same token ids."""
    export.export(ckpt, str(tmp_path / "a" / "hf"), kind="encoder")
    out, _ = run(capsys, f"--init_from={ckpt},hf:{tmp_path / 'a' / 'hf'}", "--show=fill,loss",
                 "--text=The value of <|mask|> is returned.", f"--loss_text={TEXT}")
    for (i, p), (j, q) in zip(out["fill"]["a"][0], out["fill"]["hf:a/hf"][0]):
        assert i == j and p == pytest.approx(q, rel=1e-5)
    # the losses' softmax also spans the padding rows past the vocabulary, which the export drops
    # and load_hf refills with the mean row: equal up to their share of the probability mass
    assert out["loss"]["a"] == pytest.approx(out["loss"]["hf:a/hf"], rel=1e-3)

def error(*args):
    with pytest.raises(SystemExit) as e:
        sample.main(list(args))
    return str(e.value)

def test_bad_input_is_one_line_naming_the_fix(ckpt, tmp_path):
    assert "--text has no <|mask|>" in error(f"--init_from={ckpt}", "--show=fill",
                                             "--text=nothing to fill")
    long_prompt = " ".join(["items"] * 70)
    assert "no room in the model's context of 64" in error(f"--init_from={ckpt}",
                                                           "--show=continue",
                                                           f"--prompt={long_prompt}")
    assert "more than the model's context of 64" in error(
        f"--init_from={ckpt}", "--show=fill", f"--text={long_prompt} <|mask|>")
    # another tokenizer in the same comparison
    other = get_tokenizer("cl100k_1k")
    torch.manual_seed(0)
    m = M.Transformer(M.model_config("test", vocab_size=other.n_vocab, block_size=64))
    torch.save(checkpoints.checkpoint_payload(m, tokenizer=other.meta()), tmp_path / "o.pt")
    assert "uses cl100k_1k" in error(f"--init_from={ckpt},{tmp_path / 'o.pt'}")
    # a checkpoint whose tokenizer description does not match the tokenizer of that name
    payload = torch.load(ckpt, weights_only=True)
    payload["tokenizer"] = {**payload["tokenizer"], "mask_id": 5}
    torch.save(payload, tmp_path / "edited.pt")
    assert "mask_id" in (e := error(f"--init_from={tmp_path / 'edited.pt'}")) and \
        "restore the tokenizer" in e
    # not a checkpoint, a directory, nothing at all
    (tmp_path / "notes.json").write_text(json.dumps({"a": 1}))
    assert "not a complete PyTorch checkpoint" in error(f"--init_from={tmp_path / 'notes.json'}")
    assert "write hf:" in error(f"--init_from={tmp_path}")
    assert "no checkpoint at" in error(f"--init_from={tmp_path / 'missing.pt'}")
    assert "--show='generate'" in error(f"--init_from={ckpt}", "--show=generate")
    assert "use one or the other" in error(f"--init_from={ckpt}", "--mask_ratio=0.3")
    assert "the losses need a plain text" in error(f"--init_from={ckpt}", "--show=loss",
                                                   "--loss_text=")
    for e in [error(f"--init_from={ckpt}", "--show=fill", "--text=x"),
              error(f"--init_from={tmp_path / 'notes.json'}")]:
        assert e.startswith("error: ") and "\n" not in e

def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["--help"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert all(f"--{name}=" in printed for name in sample.SampleConfig.__dataclass_fields__)
