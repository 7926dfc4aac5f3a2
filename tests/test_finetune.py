"""
Fine-tuning and evaluation (finetune.py, tasks.py, task_data.py, metrics.py): the metrics against
hand-computed values, tokens and words, the four heads, the sweep and its report, bad input, and
the offline demo tasks built from docstrings (docstrings.py).
"""

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import statistics

import pytest
import torch

from mlm_vs_clm import checkpoints
from mlm_vs_clm import docstrings
import finetune as ft
from mlm_vs_clm import metrics
from mlm_vs_clm import task_data
from mlm_vs_clm import qa
from mlm_vs_clm import tasks
from tests.helpers import (FILLER, TOK, error_of, make_checkpoint, make_family, rows, sc_files,
                      tiny_body, write_jsonl)
from mlm_vs_clm.settings import configure
from mlm_vs_clm.task_data import FAMILIES
from model import lr_at

# --------------------------------------------------------------------------------------------------
# Metrics against hand-computed values

def test_bio_entities_read_like_conlleval():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "I-PER", "B-ORG", "B-ORG"]
    # I-LOC after O starts an entity; B-LOC right after splits; I-PER after LOC starts a PER;
    # B-ORG B-ORG is two
    assert metrics.bio_entities(tags) == {(0, 2, "PER"), (3, 5, "LOC"), (5, 6, "LOC"),
                                          (6, 7, "PER"), (7, 8, "ORG"), (8, 9, "ORG")}

def test_entity_f1_partial_overlaps_and_types():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-LOC", "I-LOC"]]
    # gold: PER 0-2, LOC 3-4, ORG 0-1; predicted: PER 0-1 (span too short), LOC 3-4 (exact),
    # LOC 0-2 (wrong span and type): 1 correct of 3 predicted and 3 gold
    scores = metrics.entity_f1(gold, pred)
    assert scores == pytest.approx({"precision": 1 / 3, "recall": 1 / 3, "f1": 1 / 3})
    assert metrics.entity_f1(gold, gold)["f1"] == 1.0
    # the type change splits the span
    assert metrics.entity_f1([["B-PER", "I-PER"]], [["B-PER", "I-LOC"]])["f1"] == 0.0
    assert metrics.entity_f1([["O"]], [["O"]])["f1"] == 0.0

def test_squad_normalisation_exact_and_f1():
    assert metrics.normalize_answer("  The Quick,  brown fox!") == "quick brown fox"
    # articles only as whole words
    assert metrics.normalize_answer("an apple a day; theater") == "apple day theater"
    assert metrics.squad_scores("Cat.", ["the cat"]) == (1.0, 1.0)
    exact, f1 = metrics.squad_scores("the cat sat", ["A cat sat on the mat", "cat"])
    # vs "cat sat on mat": 2 common, P 1, R 1/2, F1 2/3; vs "cat": P 1/2, R 1, F1 2/3
    assert exact == 0.0 and f1 == pytest.approx(2 / 3)
    assert metrics.squad_scores("dog", ["cat"]) == (0.0, 0.0)
    # SQuAD v2: "" is the no-answer
    assert metrics.squad_scores("", []) == (1.0, 1.0)
    assert metrics.squad_scores("cat", []) == (0.0, 0.0)
    assert metrics.squad_scores("", ["cat"]) == (0.0, 0.0)
    assert metrics.squad_scores("the", ["cat"]) == (0.0, 0.0)  # normalises to the empty answer

def test_ndcg_mrr_graded_relevance():
    ranked = [[3, 1, 2, 0], [0, 1], list(range(20, 31)) + [4]]
    relevance = [{1: 2, 2: 1, 5: 1}, {0: 0}, {4: 3}]
    dcg = 0 + 2 / math.log2(3) + 1 / math.log2(4)
    # ideal: grades 2, 1, 1 (doc 5 never retrieved)
    idcg = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    # query 2 has no relevant document: left out; query 3's only relevant document is 12th: 0 for
    # both metrics
    scores = metrics.ndcg_mrr(ranked, relevance, k=10)
    assert scores["ndcg@10"] == pytest.approx((dcg / idcg + 0) / 2)
    assert scores["mrr@10"] == pytest.approx((1 / 2 + 0) / 2)
    assert metrics.ndcg_mrr([[7, 8]], [{7: 1}], k=10) == {"ndcg@10": 1.0, "mrr@10": 1.0}
    with pytest.raises(ValueError, match="no query has a relevant document"):
        metrics.ndcg_mrr([[0]], [{0: 0}])
    # BEIR's mean: the judged query without a relevant document counts 0
    zero = metrics.ndcg_mrr(ranked, relevance, k=10, empty_queries="zero")
    assert zero["ndcg@10"] == pytest.approx((dcg / idcg + 0 + 0) / 3)
    assert zero["mrr@10"] == pytest.approx((1 / 2 + 0 + 0) / 3)
    with pytest.raises(ValueError, match="no query has a relevant document"):
        metrics.ndcg_mrr([[0]], [{0: 0}], empty_queries="zero")

def test_ranking_ties_keep_corpus_order():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1], [1.0, 1.0, 1.0, 1.0, 1.0]])
    assert metrics.rank_documents(scores, 10) == [[1, 3, 0, 2, 4], [0, 1, 2, 3, 4]]
    assert metrics.rank_documents(scores, 2) == [[1, 3], [0, 1]]

def test_t_quantiles_and_confidence_interval():
    assert metrics.t975(1) == 12.7062 and metrics.t975(4) == 2.7764 and metrics.t975(30) == 2.0423
    assert metrics.t975(50) == pytest.approx(2.0086, abs=2e-4)  # Student's t: 2.00856
    assert metrics.t975(10 ** 6) == pytest.approx(1.95997, abs=1e-4)
    mean, half = metrics.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and half == pytest.approx(2.7764 * math.sqrt(2.5) / math.sqrt(5))  # = 1.9632
    assert metrics.mean_ci([4.0]) == (4.0, None)

def test_report_means_intervals_choice_and_stability():
    def cell(lr, seed, val, test):
        return {"lr": lr, "seed": seed, "val": {"accuracy": val}, "test": {"accuracy": test},
                "diverged_at": None}
    results = [cell(1e-4, 0, 70, 60), cell(1e-4, 1, 72, 62), cell(1e-4, 2, 74, 67),
               cell(1e-3, 0, 80, 70), cell(1e-3, 1, 80, 72), cell(1e-3, 2, 80, 74),
               cell(1e-2, 0, 10, 10), cell(1e-2, 1, 10, 10),
               cell(1e-2, 2, 40, 10) | {"diverged_at": 3}]
    rep = ft.report(results, "accuracy")
    row = rep["per_lr"][0]
    assert row["val_mean"] == 72 and row["test_mean"] == pytest.approx(63)
    sd = statistics.stdev([60, 62, 67])  # 3.6056
    assert row["test_ci95"] == pytest.approx(4.3027 * sd / math.sqrt(3))  # 8.957
    assert rep["per_lr"][1]["val_ci95"] == 0.0 and rep["per_lr"][2]["diverged"] == 1
    assert rep["chosen_lr"] == 1e-3 and rep["test_mean"] == 72
    assert rep["test_ci95"] == pytest.approx(4.3027 * 2 / math.sqrt(3))
    assert rep["stability_sd"] == pytest.approx(statistics.stdev([63, 72, 10]))
    # the learning rate with a diverged seed left out
    assert rep["stability_lrs_converged"] == [1e-4, 1e-3]
    assert rep["stability_sd_converged"] == pytest.approx(statistics.stdev([63, 72]))
    all_diverged = [r | {"diverged_at": 1} for r in results if r["lr"] != 1e-4]
    assert ft.report(all_diverged, "accuracy")["stability_sd_converged"] is None

def test_lr_schedule_warms_up_then_decays_to_zero():
    def lr_factor(step, steps, warmup_steps):  # what train_cell multiplies the learning rate by
        return lr_at(step, 1.0, steps, warmup_steps, steps - warmup_steps)
    factors = [lr_factor(s, 10, 1) for s in range(10)]
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(1 / 9) and \
        factors == sorted(factors, reverse=True)
    assert [lr_factor(s, 20, 2) for s in range(3)] == [0.5, 1.0, 1.0]

# --------------------------------------------------------------------------------------------------
# Tokens, words and characters

def test_align_words_first_subtoken_per_word():
    words = ["Hello", "wörld", "tokenization", "x"]
    ids, starts = tasks.align_words(TOK, words, 64)
    assert TOK.decode(ids) == "Hello wörld tokenization x"
    bounds = starts + [len(ids)]
    assert [TOK.decode(ids[a:b]).strip() for a, b in zip(bounds, bounds[1:])] == words
    ids3, starts3 = tasks.align_words(TOK, words, bounds[3])  # room for three words only
    assert starts3 == starts[:3] and ids3 == ids[:bounds[3]]
    long_ids, long_starts = tasks.align_words(TOK, ["a" * 300], 8)
    assert len(long_ids) == 8 and long_starts == [0]

def test_token_spans_cover_text_even_inside_multibyte_characters():
    text = "naïve 😀 café: ok"
    ids = TOK.encode(text)
    spans = qa.token_spans(TOK, ids, text)
    assert len(spans) == len(ids) and spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, in order
    assert "".join(text[s:e] for s, e in spans) == text

def test_pooling_ignores_padding():
    hidden = torch.arange(24, dtype=torch.float32).view(2, 3, 4)  # (B, T, C)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert torch.equal(tasks.pool(hidden, mask, "mean")[0], hidden[0, :2].mean(0))
    assert torch.equal(tasks.pool(hidden, mask, "last"), torch.stack([hidden[0, 1], hidden[1, 2]]))
    assert torch.equal(tasks.pool(hidden, mask, "first"), hidden[:, 0])

def encoded(family_name, records, input_format, max_len=64, **settings):
    family, _ = make_family(family_name, records, max_len=max_len, input_format=input_format,
                            **settings)
    return family, family.encode(rows(records))

def test_sc_inputs_in_both_formats():
    eot = TOK.eot_id
    single = [{"text": "a gem of a film", "label": 1}]
    _, split = encoded("sc", single, "paper")
    assert split.items[0].ids == TOK.encode("a gem of a film") + [eot]  # the text, then <eot>
    _, split = encoded("sc", single, "eot")
    assert split.items[0].ids == TOK.encode("a gem of a film")  # nothing appended
    pair = [{"text": "A man sleeps.", "text_pair": "Nobody sleeps.", "label": 0}]
    _, split = encoded("sc", pair, "paper")  # a JSONL pair: two lines, no dataset labels known
    assert split.items[0].ids == TOK.encode("A man sleeps.\nNobody sleeps.") + [eot]
    _, split = encoded("sc", pair, "eot")
    assert split.items[0].ids == TOK.encode("A man sleeps.") + [eot] + TOK.encode("Nobody sleeps.")
    # cut to max_len: paper keeps its <eot> last
    long = [{"text": " ".join(FILLER * 5), "label": 0}]
    _, split = encoded("sc", long, "paper", max_len=16)
    assert len(split.items[0].ids) == 16 and split.items[0].ids[-1] == eot
    assert split.items[0].ids[:15] == TOK.encode(long[0]["text"])[:15]
    _, split = encoded("sc", long, "eot", max_len=16)
    assert split.items[0].ids == TOK.encode(long[0]["text"])[:16]

def test_tc_inputs_in_both_formats():
    record = {"words": ["EU", "rejects", "German", "call"], "tags": ["I-ORG", "O", "I-MISC", "O"]}
    _, paper = encoded("tc", [record], "paper")
    _, plain = encoded("tc", [record], "eot")
    # the same words and word starts; paper appends <eot>, a position without a label
    assert paper.items[0].ids == plain.items[0].ids + [TOK.eot_id]
    assert paper.items[0].starts == plain.items[0].starts and TOK.eot_id not in plain.items[0].ids
    long = {"words": FILLER * 3, "tags": ["O"] * len(FILLER) * 3}
    _, paper = encoded("tc", [long], "paper", max_len=12)
    assert len(paper.items[0].ids) <= 12 and paper.items[0].ids[-1] == TOK.eot_id
    kept = len(paper.items[0].starts)  # the words that fit before the <eot>
    assert 0 < kept < len(long["words"])
    assert TOK.decode(paper.items[0].ids[:-1]) == " ".join(long["words"][:kept])

def test_ir_inputs_in_both_formats():
    records = [{"query": "what is x", "document": "x is a letter"}]
    family, split = encoded("ir", records, "paper")
    split = family.encode(rows(records), ["another text"])
    assert split.queries == [TOK.encode("Query: what is x") + [TOK.eot_id]]
    assert split.documents == [TOK.encode("Document: x is a letter") + [TOK.eot_id],
                               TOK.encode("Document: another text") + [TOK.eot_id]]
    _, split = encoded("ir", records, "eot")
    assert split.queries == [TOK.encode("what is x")]
    assert split.documents == [TOK.encode("x is a letter")]
    _, split = encoded("ir", [{"query": "q", "document": " ".join(FILLER * 5)}], "paper",
                       max_len=10)
    assert len(split.documents[0]) == 10 and split.documents[0][-1] == TOK.eot_id

def qa_example(answer_at_end=True):
    filler = " ".join(f"word{i}" for i in range(60))
    context = f"{filler} The secret code is Blue Falcon. {filler}" if answer_at_end else filler
    start = context.find("Blue Falcon")
    answers = {"text": ["Blue Falcon"], "answer_start": [start]} if answer_at_end else \
        {"text": [], "answer_start": []}
    return {"id": "q1" if answer_at_end else "q0", "question": "What is the code?",
            "context": context, "answers": answers}

def oracle_logits(split):
    """Start and end logits that peak on each window's training target."""
    starts, ends = [], []
    for ids, *_, (s, e) in split.items:
        starts.append(torch.nn.functional.one_hot(torch.tensor(s), len(ids)).float() * 10)
        ends.append(torch.nn.functional.one_hot(torch.tensor(e), len(ids)).float() * 10)
    return starts, ends

@pytest.mark.parametrize("input_format", ["paper", "eot"])
def test_qa_stride_windows_map_answers_back_to_characters(input_format):
    family, _ = make_family("qa", [qa_example(), qa_example(False)], max_len=56, doc_stride=24,
                            input_format=input_format)
    split = family.encode(rows([qa_example(), qa_example(False)]))
    windows = [item for item in split.items if item[1][0] == "q1"]
    assert len(windows) > 5  # ~250 context tokens in windows of ~40
    prompt = {"paper": TOK.encode("Question: What is the code?\nContext: "),
              "eot": TOK.encode("What is the code?") + [TOK.eot_id]}[input_format]
    for ids, _, lo, hi, offset, (s, e) in windows:
        # the prompt, the context piece right after it, the null answer on the final <eot>
        assert len(ids) <= 56 and ids[:offset + lo] == prompt and ids[-1] == TOK.eot_id
        assert ids.count(TOK.eot_id) == prompt.count(TOK.eot_id) + 1
        if s != len(ids) - 1:  # the answer is in this window: its tokens decode to it
            assert TOK.decode(ids[s:e + 1]).strip() == "Blue Falcon"
    inside = [w for w in windows if w[5][0] != len(w[0]) - 1]
    assert len(inside) >= 2  # overlapping windows: the answer sits in more than one
    # oracle logits (peaks on each window's targets) must give back the exact character span, and
    # "" for q0
    assert family.predict(split, *oracle_logits(split)) == {"q1": "Blue Falcon", "q0": ""}
    assert family.score(split, {"q1": "blue falcon", "q0": ""}) == {"f1": 1.0, "exact": 1.0}

def test_qa_candidates_restrict_the_answer_to_entity_mentions():
    context = "Paris is big. The city of Lyon and the Loire Valley region are not @highlight news"
    spans = {name: [context.find(name), context.find(name) + len(name)]
             for name in ("Paris", "Lyon", "the Loire Valley region")}
    record = {"id": "r1", "question": "@placeholder is the capital", "context": context,
              "answers": {"text": ["Paris"], "answer_start": [0]},
              "candidates": [spans["Lyon"], spans["the Loire Valley region"]]}
    family, _ = make_family("qa", [record], max_answer_tokens=2)
    split = family.encode(rows([record]))
    example = split.items[0].example
    assert [[c.start, c.end] for c in example.candidates] == record["candidates"]
    # the oracle points at "Paris", which is no candidate: the best-scoring candidate wins instead
    starts, ends = oracle_logits(split)
    window = split.items[0]
    region = example.candidates[1]
    starts[0][region.first + window.offset] += 5
    ends[0][region.last + window.offset] += 5  # 4 tokens: longer than max_answer_tokens, allowed
    assert family.predict(split, starts, ends) == {"r1": "the Loire Valley region"}
    # without candidates, any span
    plain_record = {k: v for k, v in record.items() if k != "candidates"}
    without, _ = make_family("qa", [plain_record], max_answer_tokens=2)
    plain = without.encode(rows([plain_record]))
    assert without.predict(plain, *oracle_logits(plain)) == {"r1": "Paris"}
    for bad, message in (([], "must be a non-empty list"), ([[5, 2]], "item 0"),
                         ([[0, 999]], "item 0"), ([[0, 1], "x"], "item 1"),
                         ([[0.0, 1]], "item 0")):
        with pytest.raises(ValueError) as e:
            make_family("qa", [record | {"candidates": bad}])
        assert str(e.value).startswith(f"train.jsonl, line 1: field 'candidates' {message}")

def test_qa_scores_the_best_gold_answer_like_record():
    # ReCoRD: several gold answers (the mentions of one entity); F1 and EM are the best over them
    record = {"id": "r", "question": "Who? @placeholder",
              "context": "Barack Obama, or Obama, spoke.",
              "answers": {"text": ["Barack Obama", "Obama"], "answer_start": [0, 17]}}
    family, _ = make_family("qa", [record])
    split = family.encode(rows([record]))
    assert family.score(split, {"r": "Obama"}) == {"f1": 1.0, "exact": 1.0}
    assert family.score(split, {"r": "Obama spoke"}) == \
        pytest.approx({"f1": 2 / 3, "exact": 0.0})  # vs "Obama": P 1/2, R 1

def test_window_starts_cover_the_context():
    assert qa.window_starts(10, 20, 5) == [0]
    assert qa.window_starts(100, 40, 10) == [0, 30, 60]  # 0-40, 30-70, 60-100

def test_parameter_sections_numpydoc_and_google():
    numpydoc = ("Sum of array elements.\n\nParameters\n----------\na : array_like\n"
                "    Elements to sum. Really.\naxis : int, optional\n    Axis along\n"
                "    which to sum\n\nReturns\n-------\nout : ndarray\n    Sum.")
    (start, end, params), = docstrings.parameter_sections(numpydoc)
    assert numpydoc[start:end] == ("Parameters\n----------\na : array_like\n"
                                   "    Elements to sum. Really.\n"
                                   "axis : int, optional\n    Axis along\n    which to sum")
    assert {name: numpydoc[s:e] for name, s, e in params} == \
        {"a": "Elements to sum.", "axis": "Axis along\n    which to sum"}
    google = ("Do it.\n\nArgs:\n    x (Tensor): the input. More text.\n    x1, x2: shared.\n"
              "    dim (int, optional): the\n        dimension\n\n"
              "Returns:\n    y (Tensor): the output.")
    (start, end, params), = docstrings.parameter_sections(google)
    assert google[start:end] == ("Args:\n    x (Tensor): the input. More text.\n"
                                 "    x1, x2: shared.\n"
                                 "    dim (int, optional): the\n        dimension")
    # "x1, x2" share one description: no single parameter to ask about
    assert {name: google[s:e] for name, s, e in params} == \
        {"x": "the input.", "dim": "the\n        dimension"}
    assert docstrings.parameter_sections("No sections here.\n\nReturns:\n    y: z.") == []

def test_markup_to_bio():
    words, tags = docstrings.markup_to_bio("Call ``f(x, y)`` or :func:`~torch.nn.functional.relu` "
                                           "(see :math:`x^2`), not `np.sum`.")
    assert words == ["Call", "f(x,", "y)", "or", "relu", "(see", "x^2", "),", "not", "np.sum", "."]
    assert tags == ["O", "B-LIT", "I-LIT", "O", "B-REF", "O", "O", "O", "O", "B-REF", "O"]

# --------------------------------------------------------------------------------------------------
# The heads: transformers' EuroBERT heads, names and all

def test_sequence_classifier_is_eurobert_dense_gelu_classifier():
    torch.manual_seed(0)
    head = tasks.SequenceClassifier(16, 3)
    assert list(head.state_dict()) == ["dense.weight", "dense.bias", "classifier.weight",
                                       "classifier.bias"]
    assert head.dense.weight.shape == (16, 16) and head.classifier.weight.shape == (3, 16)
    # the new head starts as transformers' _init_weights leaves it: N(0, 0.02), zero biases
    assert head.dense.bias.abs().sum() == 0 and head.classifier.bias.abs().sum() == 0
    assert 0.015 < head.dense.weight.std() < 0.025
    torch.nn.init.normal_(head.dense.bias)
    x = torch.randn(4, 16)
    h = x @ head.dense.weight.T + head.dense.bias
    exact_gelu = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # not the tanh approximation
    expected = exact_gelu @ head.classifier.weight.T + head.classifier.bias
    assert torch.allclose(head(x), expected, atol=1e-6)
    family, _ = make_family("sc", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    assert family.export() == {"labels": ["x", "y"], "head_type": "eurobert_sc_mean"}

def test_token_classifier_and_the_other_heads_export():
    family, _ = make_family("tc", [{"words": ["EU", "x"], "tags": ["B-ORG", "O"]}])
    head = family.head(16)
    assert list(head.state_dict()) == ["classifier.weight", "classifier.bias"]
    assert family.export() == {"labels": ["O", "B-ORG"], "head_type": "linear_tc"}
    family, _ = make_family("qa", [qa_example()])
    assert family.export() == {"labels": [], "head_type": "qa_start_end"}
    family, _ = make_family("ir", [{"query": "q", "document": "d"}])
    assert family.export() == {"labels": [], "head_type": "none"}
    assert dict(family.head(16).state_dict()) == {}

@pytest.mark.slow
def test_heads_match_transformers_eurobert():
    """Our heads on given hidden states give transformers' EuroBertForSequenceClassification
    (pooling "mean" and "bos" = our first) and EuroBertForTokenClassification logits."""
    transformers = pytest.importorskip("transformers")
    config = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, intermediate_size=32, num_labels=3, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, mask_token_id=3)
    hidden = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])

    class Body(torch.nn.Module):  # stands in for the encoder: returns the given hidden states
        def forward(self, *args, **kwargs):
            return transformers.modeling_outputs.BaseModelOutput(last_hidden_state=hidden)
    ids = torch.zeros(2, 5, dtype=torch.long)
    for ours, theirs in (("mean", "mean"), ("first", "bos")):
        hf = transformers.EuroBertForSequenceClassification(
            transformers.EuroBertConfig(**config, classifier_pooling=theirs))
        assert isinstance(hf.activation, torch.nn.GELU) and hf.activation.approximate == "none"
        head = tasks.SequenceClassifier(16, 3)
        torch.nn.init.normal_(head.dense.bias)
        torch.nn.init.normal_(head.classifier.bias)
        hf.load_state_dict(head.state_dict(), strict=False)  # ours: a subset of its names
        hf.model = Body()
        expected = hf(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(head(tasks.pool(hidden, mask.bool(), ours)), expected, atol=1e-6)
    hf = transformers.EuroBertForTokenClassification(transformers.EuroBertConfig(**config))
    head = tasks.TokenClassifier(16, 3)
    hf.load_state_dict(head.state_dict(), strict=False)
    hf.model = Body()
    assert torch.allclose(head(hidden), hf(input_ids=ids).logits, atol=1e-6)

# --------------------------------------------------------------------------------------------------
# Each head learns a small learnable task on a tiny random model, clearly above chance

def train_and_score(name, train, test, lr=2e-3, steps=60, max_len=64, **settings):
    family, cfg = make_family(name, train, max_len=max_len, batch_size=16, max_steps=steps,
                              warmup=0.1, **settings)
    splits = {"train": family.encode(rows(train)), "test": family.encode(rows(test))}
    return ft.train_cell(family, tiny_body(), splits, cfg, lr, seed=0)[0], family, splits

def test_sequence_classification_head_learns():
    rng = random.Random(0)
    good, bad = "good great superb lovely".split(), "bad awful boring terrible".split()

    def example():
        label = rng.choice(["pos", "neg"])
        words = rng.choices(FILLER, k=8)
        words.insert(rng.randrange(9), rng.choice(good if label == "pos" else bad))
        return {"text": " ".join(words), "label": label}
    result, *_ = train_and_score("sc", [example() for _ in range(1000)],
                                 [example() for _ in range(200)])
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
    result, *_ = train_and_score("tc", [example() for _ in range(1000)],
                                 [example() for _ in range(200)])
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
        return {"id": str(i), "question": "Which colour?", "context": " ".join(words),
                "answers": answers}
    train, test = [example(i) for i in range(1000)], [example(i) for i in range(200)]
    result, family, splits = train_and_score("qa", train, test, steps=60)
    # always "no answer" scores the unanswerable share
    trivial = 100 * family.trivial(splits["test"])["f1"]
    assert 20 < trivial < 40 and result["test"]["f1"] > trivial + 30

def test_retrieval_head_learns_an_association():
    rng = random.Random(0)
    animals = ("cat dog horse cow sheep goat mouse lion tiger bear wolf fox deer duck goose "
               "swan").split()
    things = ("table chair window door spoon knife plate bottle pencil paper lamp clock phone shoe "
              "hat coat").split()
    # an arbitrary pairing the model must learn
    thing_of = dict(zip(animals, rng.sample(things, len(things))))

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
    result = ft.train_cell(family, body, splits, cfg, 2e-3, seed=0)[0]
    # 16 queries, each with ~4 relevant documents among 64: the untrained body ranks them about
    # at random
    assert before < 40 and result["test"]["ndcg@10"] > before + 40

# --------------------------------------------------------------------------------------------------
# The command: the sweep, its report, restarts, bad input

def test_sweep_writes_report_and_restarts_without_redoing_cells(tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    train, test = sc_files(tmp_path)
    settings = {"init_from": ckpt, "task": "sc", "train": train, "test": test,
                "out_dir": f"{tmp_path}/out", "lrs": "1e-3,2e-3", "seeds": 2, "batch_size": 8,
                "max_steps": 3, "progress": False}
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
    real = ft.train_cell
    monkeypatch.setattr(ft, "train_cell", lambda *a: calls.append(a[4:]) or real(*a))
    with open(tmp_path / "out" / "results.jsonl", "a") as f:
        f.write('{"key": "trunc')  # what a run killed mid-write leaves
    assert ft.main(argv)["per_lr"] == rep["per_lr"] and calls == []  # everything reused
    ft.main(argv + ["--seeds=3"])
    assert calls == [(1e-3, 2), (2e-3, 2)]  # only the new seed
    moved = tmp_path / "moved"  # the same records elsewhere: the same cells
    moved.mkdir()
    for name in ("train", "test"):
        shutil.copy(settings[name], moved / f"{name}.jsonl")
    ft.main(argv + ["--seeds=3", f"--train={moved / 'train.jsonl'}",
                    f"--test={moved / 'test.jsonl'}"])
    assert len(calls) == 2
    # a different setting is a different experiment: all cells again
    ft.main(argv + ["--pooling=last"])
    assert len(calls) == 6

def test_report_says_when_no_learning_shows_and_when_an_interval_is_wide(capsys):
    row = {"lr": 1e-3, "seeds": 2, "val_mean": 60.0, "val_ci95": 5.0, "diverged": 0}

    def report(test_mean, ci):
        ft.print_report({"metric": "accuracy", "chosen_lr": 1e-3, "test_mean": test_mean,
                         "test_ci95": ci, "stability_sd": None, "stability_sd_converged": None,
                         "stability_lrs_converged": [1e-3],
                         "per_lr": [row | {"test_mean": test_mean, "test_ci95": ci}],
                         "trivial": {"rule": "the most frequent training label", "test": 60.0}})
        return capsys.readouterr().out
    assert "scores 60.00 on test: the chosen score is within its 95% interval" in report(61, 3)
    assert "within" not in report(70, 3) and "within" not in report(61, None)  # one seed
    assert "wider than the score's range: 2 seeds" in report(95, 10)

def test_same_cell_gives_same_result(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    train, test = sc_files(tmp_path)
    base = [f"--init_from={ckpt}", "--task=sc", f"--train={train}", f"--test={test}", "--lrs=1e-3",
            "--seeds=1", "--batch_size=8", "--max_steps=3", "--progress=False"]
    a = ft.main(base + [f"--out_dir={tmp_path}/a"])
    b = ft.main(base + [f"--out_dir={tmp_path}/b"])
    assert a["per_lr"] == b["per_lr"]

@pytest.mark.slow
def test_compiled_fine_tuning_matches_eager(tmp_path):
    """--compile=true: the body compiled with dynamic sequence lengths scores as the eager one."""
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    train, test = sc_files(tmp_path)
    base = [f"--init_from={ckpt}", "--task=sc", f"--train={train}", f"--test={test}", "--lrs=1e-3",
            "--seeds=1", "--batch_size=8", "--max_steps=3", "--progress=False"]
    eager = ft.main(base + [f"--out_dir={tmp_path}/eager"])
    compiled = ft.main(base + [f"--out_dir={tmp_path}/compiled", "--compile=true"])
    assert compiled["test_mean"] == pytest.approx(eager["test_mean"], abs=1e-6)

def test_default_master_weights_keep_updates_bf16_rounds_away():
    """fp32 master weights (the default) take a tiny update that bfloat16 weights round away."""
    assert ft.FinetuneConfig().weights == "fp32"
    records = [{"text": f"{w} film", "label": w} for w in ["good", "bad"] * 8]
    family, cfg = make_family("sc", records, batch_size=8, max_steps=1, warmup=0.0)
    splits = {"train": family.encode(rows(records)), "test": family.encode(rows(records))}
    changed = {}
    for dtype in (torch.float32, torch.bfloat16):
        body = tiny_body().to(dtype)
        before = body.blocks[0].mlp.up_proj.weight.detach().clone()
        ft.train_cell(family, body, splits, cfg, 1e-7, seed=0)
        changed[dtype] = (body.blocks[0].mlp.up_proj.weight != before).float().mean().item()
    assert changed[torch.float32] > 0.5 and changed[torch.bfloat16] < 0.05

SMALL_TASKS = {
    "sc": [{"text": f"{w} film", "label": w} for w in ["good", "bad"] * 8],
    "tc": [{"words": ["Alice", "sees", "Bob"], "tags": ["B-PER", "O", "B-PER"]}] * 16,
    "qa": [{"id": str(i), "question": "Which colour?", "context": f"it is red {i}",
            "answers": {"text": ["red"], "answer_start": [6]}} for i in range(16)],
    "ir": [{"query": f"the {i}", "document": f"number {i}"} for i in range(16)],
}

@pytest.mark.parametrize("name", list(SMALL_TASKS))
def test_bf16_weights_train_on_cpu(name, monkeypatch):
    """--weights=bf16: body, head and AdamW state in bfloat16; a step changes them; finite
    scores."""
    records = SMALL_TASKS[name]
    family, cfg = make_family(name, records, batch_size=8, max_steps=2, warmup=0.0)
    body = tiny_body().to(torch.bfloat16)
    before = {k: v.clone() for k, v in body.state_dict().items()}
    optimizers, real = [], ft.configure_optimizer
    monkeypatch.setattr(ft, "configure_optimizer",
                        lambda *a, **k: optimizers.append(real(*a, **k)) or optimizers[-1])
    splits = {"train": family.encode(rows(records)), "test": family.encode(rows(records))}
    result, head = ft.train_cell(family, body, splits, cfg, 1e-2, seed=0)
    assert all(p.dtype == torch.bfloat16 for p in [*body.parameters(), *head.parameters()])
    assert not torch.equal(before["blocks.0.attn.q_proj.weight"],
                           body.state_dict()["blocks.0.attn.q_proj.weight"])
    states = list(optimizers[0].state.values())
    assert states and all(s["exp_avg"].dtype == torch.bfloat16 for s in states)
    assert result["diverged_at"] is None
    assert all(math.isfinite(v) for v in result["test"].values())

def test_bf16_weights_end_to_end(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    train, test = sc_files(tmp_path)
    rep = ft.main([f"--init_from={ckpt}", "--task=sc", f"--train={train}", f"--test={test}",
                   f"--out_dir={tmp_path}/out", "--lrs=1e-3", "--seeds=1", "--batch_size=8",
                   "--max_steps=2", "--weights=bf16", "--progress=False"])
    assert "in torch.bfloat16" in capsys.readouterr().out
    assert math.isfinite(rep["test_mean"]) and rep["settings"]["weights"] == "bf16"

def test_save_model_reloads_with_the_same_logits(tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    train, test = sc_files(tmp_path)
    argv = [f"--init_from={ckpt}", "--task=sc", f"--train={train}", f"--test={test}",
            f"--out_dir={tmp_path}/out", "--lrs=1e-3,3e-3", "--seeds=2", "--batch_size=8",
            "--max_steps=3", "--progress=False"]
    rep = ft.main(argv)
    assert "saved_model" not in rep and not (tmp_path / "out" / "model.pt").exists()
    calls, seen, real = [], {}, ft.train_cell

    def spy(family, body, splits, cfg, lr, seed):
        calls.append((lr, seed))
        result, head = real(family, body, splits, cfg, lr, seed)
        with torch.no_grad():  # what the trained model says on the test inputs
            seen.update(family=family, ids=[item.ids for item in splits["test"].items])
            seen["logits"] = family.logits(body, head, seen["ids"])
        return result, head
    monkeypatch.setattr(ft, "train_cell", spy)
    rep = ft.main(argv + ["--save_model=true"])  # the sweep's cells are reused
    cells = [json.loads(line) for line in open(tmp_path / "out" / "results.jsonl")]
    best = max((c for c in cells if c["lr"] == rep["chosen_lr"]),
               key=lambda c: (c["val"]["accuracy"], -c["seed"]))
    assert calls == [(rep["chosen_lr"], best["seed"])]  # only the chosen cell, once more
    saved = rep["saved_model"]
    assert saved["path"] == os.path.join(f"{tmp_path}/out", "model.pt")
    assert (saved["lr"], saved["seed"], saved["test"]) == (best["lr"], best["seed"], best["test"])

    body, _, payload = checkpoints.load_model(saved["path"])
    assert payload["step"] == 0 and payload["tokenizer"] == TOK.meta()
    tuned = payload["finetuned"]
    assert {k: tuned[k] for k in ("task", "family", "labels", "pooling", "input_format",
                                  "head_type", "lr", "seed", "source")} == \
        {"task": "sc", "family": "sc", "labels": [0, 1], "pooling": "mean", "input_format": "paper",
         "head_type": "eurobert_sc_mean", "lr": best["lr"], "seed": best["seed"], "source": ckpt}
    assert tuned["val"] == best["val"] and tuned["test"] == best["test"]
    head = tasks.SequenceClassifier(body.config.n_embd, len(tuned["labels"]))
    head.load_state_dict(tuned["head"])
    with torch.no_grad():
        assert torch.equal(seen["family"].logits(body, head, seen["ids"]), seen["logits"])
    on_disk = json.load(open(tmp_path / "out" / "report.json"))
    assert on_disk["saved_model"]["seed"] == best["seed"]

def test_validation_file_replaces_the_hold_out(tmp_path):
    train, test = sc_files(tmp_path)
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "a good film", "label": 1},
                                               {"text": "a bad film", "label": 0}])
    for given, counts in ((val, {"train": 64, "val": 2, "test": 16}), ("", None)):
        cfg = ft.FinetuneConfig(task="sc", train=train, val=given, test=test, progress=False)
        task = task_data.load_task(cfg)
        family = FAMILIES["sc"](cfg, TOK, task.train, torch.device("cpu"), contextlib.nullcontext,
                                64)
        _, found = ft.encode_splits(family, task, cfg)
        if counts:
            assert task.val is not None and found == counts
        else:  # held out of the training file
            assert task.val is None and found["train"] + found["val"] == 64 and found["val"] >= 1
    bad = write_jsonl(tmp_path / "bad_val.jsonl", [{"text": "x", "label": 7}])
    message = error_of([f"--init_from={make_checkpoint(tmp_path / 'c.pt')}", "--task=sc",
                        f"--train={train}", f"--val={bad}", f"--test={test}",
                        f"--out_dir={tmp_path}/o"])
    assert "bad_val.jsonl, line 1" in message and "'label'" in message
    assert "--train/--val/--test are for" in error_of(["--init_from=x.pt", "--task=sst2",
                                                       f"--val={val}"])

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
    pairs = [{"text": "p", "text_pair": "h", "label": 0},
             {"text": "p2", "text_pair": "h2", "label": 1}]
    message = run(pairs, [{"text": "single", "label": 0}])
    assert "test.jsonl, line 1" in message and "'text_pair'" in message and \
        "sentence-pair" in message
    assert "split is empty" in run(good, [])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok", "label": 1}\n{"text": oops}\n')
    bad = f"{tmp_path}/bad.jsonl"
    assert "bad.jsonl, line 2: invalid JSON" in error_of([f"--init_from={ckpt}", "--task=sc",
                                                          f"--train={bad}", f"--test={bad}"])
    message = run([{"words": ["a", "b"], "tags": ["O"]}] * 2, [{"words": ["a"], "tags": ["O"]}],
                  task="tc")
    assert "train.jsonl, line 1" in message and "'tags'" in message
    message = run([{"words": ["a"], "tags": ["B-X"]}] * 2, [{"words": ["a"], "tags": ["B-Y"]}],
                  task="tc")
    assert "test.jsonl, line 1" in message and "'tags' item 0" in message
    qa = [{"id": "1", "question": "q?", "context": "abc def",
           "answers": {"text": ["def"], "answer_start": [3]}}]
    message = run(qa, qa, task="qa")
    assert "train.jsonl, line 1" in message and "'answers'" in message and \
        "answer_start=3" in message
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
        configure(ft.FinetuneConfig, ["--help"])
    out = capsys.readouterr().out
    assert all(f"--{f.name}=" in out for f in dataclasses.fields(ft.FinetuneConfig))
    assert "learning-rate grid" in out

# --------------------------------------------------------------------------------------------------
# The offline demo tasks: real docstrings, real labels

@pytest.fixture(scope="module")
def demo():
    return {family: docstrings.demo_task(family) for family in FAMILIES}

@pytest.mark.slow
def test_demo_tasks_are_real_and_non_trivial(demo):
    for family, (train_records, test_records) in demo.items():
        assert len(train_records) > 3 * len(test_records) / 2 > 50, family
        # every record passes the checks
        built, _ = make_family(family, train_records, max_len=128, doc_stride=16)
        built.check(rows(test_records))
    labels = [r["label"] for r in demo["sc"][1]]
    assert set(labels) == {"stdlib", "numpy", "torch"} and \
        max(map(labels.count, set(labels))) / len(labels) < 0.7
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

@pytest.mark.slow
def test_demo_task_end_to_end(tmp_path, demo, monkeypatch):
    asked = []
    monkeypatch.setattr(task_data, "demo_task",
                        lambda family, data_dir: asked.append(data_dir) or demo[family])
    ckpt = make_checkpoint(tmp_path / "ckpt.pt", block_size=64)
    args = ["--task=demo_sc", f"--out_dir={tmp_path}/out", "--lrs=1e-3", "--seeds=1",
            "--max_steps=2", "--batch_size=8", "--progress=False"]
    rep = ft.main([f"--init_from={ckpt}", *args])
    assert rep["family"] == "sc" and 0 <= rep["test_mean"] <= 100 and \
        50 < rep["trivial"]["test"] < 70
    # a train.py checkpoint names its pretraining data: the demo tasks look there for the
    # held-out docstrings
    saved = torch.load(ckpt, weights_only=False)
    saved["train_config"] = {"data": "docstrings", "tokenizer": "cl100k_8k", "data_dir": ""}
    torch.save(saved, tmp_path / "trained.pt")
    ft.main([f"--init_from={tmp_path}/trained.pt", *args])
    assert asked == ["", os.path.join("data", "docstrings_cl100k_8k")]
