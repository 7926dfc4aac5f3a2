"""finetune.py --protocol=encodeval, the authors' evaluation (EncodEval, branch MLM_vs_CLM): each
formulation on hand-made records whose scores are worked out by hand, the length and step rules,
the label sets, and the datasets loaded without loading scripts. Nothing is downloaded."""

import importlib.util
import math
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import finetune as ft
from mlm_vs_clm import metrics, task_data
from mlm_vs_clm.tasks import Split
from tests.helpers import TOK, make_checkpoint, make_family, rows, sc_files, tiny_body

def test_encodeval_position_f1_by_hand():
    assert metrics.position_f1(set(), set()) == 1  # no answer, none predicted: {0} against {0}
    assert metrics.position_f1(set(), {5, 6}) == 0
    assert metrics.position_f1({5}, set()) == 0
    assert metrics.position_f1({5, 6, 7}, {6, 7}) == pytest.approx(2 * 2 / 5)  # P 2/3, R 1

def test_encodeval_sentence_macro_f1_by_hand():
    # tag 0: gold 3, predicted 2, both 2 -> 4/5; tag 1: gold 1, predicted 1, both 0 -> 0;
    # tag 2: predicted once, never gold -> 0
    assert metrics.sentence_macro_f1([0, 0, 0, 1], [0, 0, 1, 2]) == pytest.approx((0.8 + 0) / 3)
    assert metrics.sentence_macro_f1([0, 0], [0, 0]) == 1.0
    if importlib.util.find_spec("sklearn"):
        from sklearn.metrics import f1_score
        assert metrics.sentence_macro_f1([0, 0, 0, 1], [0, 0, 1, 2]) == pytest.approx(
            f1_score([0, 0, 0, 1], [0, 0, 1, 2], average="macro", zero_division=0))

def test_encodeval_top_10_ndcg_by_hand():
    relevance = [{0: 1, 1: 1}, {3: 1}, {4: 1}, {}]
    ranked = [[0, 5, 6], [7, 3], [9, 8], [0]]
    # query 0: relevant at rank 1 only -> 1 (the missed one costs nothing); query 1: at rank 2
    # -> (1 / log2 3) / 1; query 2: none retrieved -> 0; query 3: no relevant document, left out
    expected = (1 + 1 / math.log2(3) + 0) / 3
    assert metrics.top_k_ndcg(ranked, relevance, 10) == pytest.approx(expected)
    if importlib.util.find_spec("sklearn"):
        from sklearn.metrics import ndcg_score
        assert ndcg_score([[0, 1]], [[2, 1]]) == pytest.approx(1 / math.log2(3))

def fixed_head(answers: list[set]):
    """A head whose argmax is label 1 exactly at answers[row]'s positions."""
    class Head(nn.Module):
        def forward(self, hidden):
            B, T, _ = hidden.shape
            inside = torch.tensor([[t in answers[b] for t in range(T)] for b in range(B)],
                                  dtype=torch.float)
            return torch.stack([1 - inside, inside], -1)
    return Head()

def test_encodeval_qa_tags_the_first_answer_and_scores_positions():
    records = [{"id": "a", "question": "Who won?", "context": "Denver won the game.",
                "answers": {"text": ["Denver"], "answer_start": [0]}},
               {"id": "b", "question": "Who lost?", "context": "Nobody lost.",
                "answers": {"text": [], "answer_start": []}}]
    family, cfg = make_family("qa", records, max_len=64, protocol="encodeval")
    split = family.encode(rows(records))
    prompt = len(TOK.encode("Question: Who won?\nContext: "))
    answer = len(TOK.encode("Denver"))
    first = split.items[0]
    assert first.ids[-1] == TOK.eot_id and first.gold == set(range(prompt, prompt + answer))
    assert split.items[1].gold == set()  # unanswerable: every token 0
    # a prediction of exactly the answer's first token: P 1, R 1/answer; nothing for "b": 1
    body = tiny_body()
    scores = family.evaluate(body, fixed_head([{prompt}, set()]), split)
    assert scores["f1"] == pytest.approx((2 / (1 + answer) + 1) / 2)
    # an answer the truncation cuts off is no answer
    late = {"id": "c", "question": "Who?", "context": "a b c d e f g h i j k l m n o p Denver",
            "answers": {"text": ["Denver"], "answer_start": [32]}}
    short, _ = make_family("qa", [late], max_len=16, protocol="encodeval")
    assert short.encode(rows([late])).items[0].gold == set()
    loss = family.loss(body, nn.Linear(64, 2), split.items)
    assert loss.ndim == 0 and torch.isfinite(loss)

def test_encodeval_tc_tags_every_subtoken_and_votes_per_word():
    names = ["O", "B-PER", "I-PER", "B-LOC"]
    records = [{"words": ["Alexandria", "visits", "Rome"], "tags": ["B-PER", "O", "B-LOC"]}]
    family, _ = make_family("tc", records, max_len=64, labels=names, protocol="encodeval")
    assert family.tags == names  # the dataset's ids, not the training file's tags
    item = family.encode(rows(records)).items[0]
    n_first = len(TOK.encode("Alexandria"))
    assert n_first > 1 and item.starts[:n_first] == [0] * n_first and item.starts[-1] == -1
    assert item.ids[-1] == TOK.eot_id and item.tags == [1, 0, 3]
    # every sub-token of word 0 says I-PER (2) but one says B-PER (1): the majority, I-PER, wins;
    # the other words are right. Macro F1 over {1, 2, 0, 3}: 1 and 2 score 0, 0 and 3 score 1
    votes = [2] * (n_first - 1) + [1] + [3 if w == 2 else 0 for w in item.starts[n_first:]]

    class Head(nn.Module):
        def forward(self, hidden):
            return torch.nn.functional.one_hot(torch.tensor([votes]), 4).float()
    assert family.evaluate(tiny_body(), Head(), Split([item]))["f1"] == pytest.approx(0.5)
    # a tie between B-PER (1) and I-PER (2) goes to the lower id, as max(set(p), key=p.count)
    votes = [1, 2] * (n_first // 2) + [3 if w == 2 else 0 for w in item.starts[n_first:]]
    assert n_first % 2 == 0 and family.evaluate(tiny_body(), Head(), Split([item]))["f1"] == 1.0

def test_encodeval_tc_accepts_a_tag_only_the_test_split_uses():
    names = ["O", "B-PER", "I-PER", "B-MISC", "I-MISC"]
    records = [{"words": ["Bob", "runs"], "tags": ["B-PER", "O"]}]
    family, _ = make_family("tc", records, labels=names, protocol="encodeval")
    family.check(rows([{"words": ["Euro"], "tags": ["B-MISC"]}]))  # unseen in training: fine
    standard, _ = make_family("tc", records, labels=names)
    with pytest.raises(ValueError, match="a tag the training file never uses"):
        standard.check(rows([{"words": ["Euro"], "tags": ["B-MISC"]}]))

def test_encodeval_ir_keeps_in_batch_false_negatives_and_scores_the_top_10():
    records = [{"query": "q1", "document": "d1"}, {"query": "q1", "document": "d2"}]
    family, _ = make_family("ir", records, protocol="encodeval")
    standard, _ = make_family("ir", records)
    batch = family.encode(rows(records)).items
    body = tiny_body()
    # the two pairs share a query: standard masks the other positive, EncodEval does not
    assert family.loss(body, None, batch) > standard.loss(body, None, batch)

def test_encodeval_length_steps_and_protocol_rules(tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "ckpt.pt", block_size=64)
    train, test = sc_files(tmp_path, n=16)
    seen = {}
    real = ft.train_cell

    def spy(family, body, splits, cfg, lr, seed):
        seen.update(max_len=family.max_len, protocol=cfg.protocol, epoch=family.one_epoch)
        result, head = real(family, body, splits, cfg, lr, seed)
        seen["steps"] = result["steps"]
        return result, head
    monkeypatch.setattr(ft, "train_cell", spy)
    base = [f"--init_from={ckpt}", "--task=sc", f"--train={train}", f"--test={test}",
            "--lrs=1e-3", "--seeds=1", "--batch_size=8", "--progress=False"]
    ft.main(base + ["--max_steps=5", f"--out_dir={tmp_path / 'a'}"])
    assert seen == dict(max_len=64, protocol="standard", epoch=False, steps=2)  # one epoch
    ft.main(base + ["--max_steps=5", "--protocol=encodeval", f"--out_dir={tmp_path / 'b'}"])
    assert seen["protocol"] == "encodeval" and seen["steps"] == 5  # epochs over
    assert "--input_format=paper" in str(pytest.raises(SystemExit, ft.main, base + [
        "--protocol=encodeval", "--input_format=eot"]).value)
    cfg = ft.FinetuneConfig(task="conll2003")
    assert cfg.max_len == 0 and ft.ENCODEVAL_MAX_LEN == round(0.99 * 2048)
    assert task_data.HF_TASKS["conll2003"].one_epoch and task_data.HF_TASKS["uner"].one_epoch
    assert not task_data.HF_TASKS["ontonotes"].one_epoch

def test_encodeval_datasets_load_without_loading_scripts(monkeypatch):
    """A stand-in `datasets` records what is asked: BEIR's files through the json builder, the
    hub's parquet conversion for the datasets that ship a script, never trust_remote_code."""
    asked = []

    def load_dataset(path, name=None, **kwargs):
        asked.append((path, name, kwargs))
        if path == "json":
            return [{"_id": "q1", "text": "what"}]
        raise ConnectionError("offline")
    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    assert task_data.hub("BeIR/msmarco", "queries", "queries") == [{"_id": "q1", "text": "what"}]
    assert asked[-1] == ("json", None, {"data_files": "hf://datasets/BeIR/msmarco/queries.jsonl.gz",
                                        "split": "train"})
    for name, config in (("hgissbkh/ontonotes5", None), ("hgissbkh/mldr-en", "default")):
        with pytest.raises(ValueError) as e:
            task_data.hub(name, config, "test")
        assert asked[-1][2]["revision"] == "refs/convert/parquet"
        assert "\n" not in str(e.value) and name in str(e.value) and "network" in str(e.value)
    assert all("trust_remote_code" not in kwargs for _, _, kwargs in asked)

def test_released_sl_model_checkpoints_load_as_bodies(tmp_path):
    """The MLMvsCLM releases: model_type sl_model, SLModel's names (no "model." prefix), no LM
    head. Their body loads for fine-tuning, bit for bit; pretraining or sampling needs a head."""
    import json

    from safetensors.torch import load_file, save_file

    from mlm_vs_clm import checkpoints, export
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    torch.save(torch.load(ckpt, weights_only=True) | {"objective": "clm"}, ckpt)
    hf_dir = tmp_path / "sl"
    export.export(ckpt, str(hf_dir))
    weights = load_file(hf_dir / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in weights.items() if k != "lm_head.weight"},
              hf_dir / "model.safetensors")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(config | {"model_type": "sl_model",
                                                             "architectures": ["SLModel"]}))
    body = checkpoints.load_model(f"hf:{hf_dir}", head=False).model
    ours = checkpoints.load_model(ckpt).model
    tokens = torch.randint(0, 8000, (1, 16))
    assert torch.equal(body(tokens, causal=False), ours(tokens, causal=False))
    with pytest.raises(ValueError, match="without an LM head: fine-tune it"):
        checkpoints.load_model(f"hf:{hf_dir}")
    train, test = sc_files(tmp_path)
    report = ft.main([f"--init_from=hf:{hf_dir}", "--task=sc", f"--train={train}",
                      f"--test={test}", "--lrs=1e-3", "--seeds=1", "--batch_size=8",
                      "--max_steps=1", "--progress=False", f"--out_dir={tmp_path / 'ft'}"])
    assert math.isfinite(report["test_mean"])
