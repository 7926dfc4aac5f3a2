"""Metrics exact as seqeval, SQuAD's script, trec_eval; EncodEval's (docs/finetuning.md); a CI."""

import math
import re
import statistics
import string
from collections import Counter

import torch

def accuracy(predicted: list, gold: list) -> float:
    return sum(p == g for p, g in zip(predicted, gold, strict=True)) / len(gold)

def bio_entities(tags: list[str]) -> set[tuple[int, int, str]]:
    """(start, end exclusive, type) per entity, as conlleval: B-X, or I-X not after X, opens one."""
    entities, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, tag_type = tag.partition("-")
        continues = prefix == "I" and start is not None and tag_type == kind
        if start is not None and not continues:
            entities.add((start, i, kind))
            start = None
        if prefix in ("B", "I") and not continues:
            start, kind = i, tag_type
    return entities

def entity_f1(gold: list[list[str]], predicted: list[list[str]]) -> dict:
    """Micro precision, recall and F1 over entities: a prediction counts if span and type match."""
    correct = n_gold = n_pred = 0
    for g, p in zip(gold, predicted, strict=True):
        g, p = bio_entities(g), bio_entities(p)
        correct, n_gold, n_pred = correct + len(g & p), n_gold + len(g), n_pred + len(p)
    precision = correct / n_pred if n_pred else 0.0
    recall = correct / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall}

def normalize_answer(text: str) -> str:
    """SQuAD's: lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())

def squad_scores(predicted: str, answers: list[str]) -> tuple[float, float]:
    """(exact match, token F1), best over the answers, as SQuAD v2's script: "" is the no-answer."""
    answers = [a for a in answers if normalize_answer(a)] or [""]
    pred = normalize_answer(predicted).split()
    exact = f1 = 0.0
    for answer in answers:
        gold = normalize_answer(answer).split()
        exact = max(exact, float(pred == gold))
        common = sum((Counter(pred) & Counter(gold)).values())
        if not pred or not gold:
            f1 = max(f1, float(pred == gold))
        elif common:
            precision, recall = common / len(pred), common / len(gold)
            f1 = max(f1, 2 * precision * recall / (precision + recall))
    return exact, f1

def rank_documents(scores: torch.Tensor, k: int) -> list[list[int]]:
    """Each row's k best documents, by a stable sort: on a tie, the earlier document ranks first."""
    return scores.float().cpu().sort(dim=1, descending=True, stable=True).indices[:, :k].tolist()

def ndcg_mrr(ranked: list[list[int]], relevance: list[dict], k: int = 10,
             empty_queries: str = "skip") -> dict:
    """Mean nDCG@k (gain: grade / log2(rank + 1), as trec_eval, BEIR) and MRR@k. A query with no
    grade > 0 is left out ("skip", as EncodEval) or scores 0 ("zero", as BEIR); none: an error."""
    if empty_queries not in ("skip", "zero"):
        raise ValueError(f"empty_queries must be 'skip' or 'zero', got {empty_queries!r}")
    ndcgs, rrs = [], []
    for docs, rel in zip(ranked, relevance, strict=True):
        ideal = sorted((g for g in rel.values() if g > 0), reverse=True)[:k]
        if not ideal and empty_queries == "skip":
            continue
        dcg = sum(rel.get(d, 0) / math.log2(r + 2) for r, d in enumerate(docs[:k]))
        ndcgs.append(dcg / sum(g / math.log2(r + 2) for r, g in enumerate(ideal)) if ideal else 0.0)
        rrs.append(next((1 / (r + 1) for r, d in enumerate(docs[:k]) if rel.get(d, 0) > 0), 0.0))
    if not any(g > 0 for rel in relevance for g in rel.values()):
        raise ValueError("no query has a relevant document (grade > 0)")
    return {f"ndcg@{k}": statistics.fmean(ndcgs), f"mrr@{k}": statistics.fmean(rrs)}

# The authors' variants (EncodEval, branch MLM_vs_CLM), for finetune.py --protocol=encodeval

def position_f1(predicted: set, gold: set) -> float:
    """EncodEval's QA score: F1 of predicted vs gold answer-token positions (an empty set: {0})."""
    predicted, gold = predicted or {0}, gold or {0}
    return 2 * len(predicted & gold) / (len(predicted) + len(gold))

def sentence_macro_f1(gold: list[int], predicted: list[int]) -> float:
    """EncodEval's TC score of a sentence: sklearn's f1_score(average="macro") on the tags seen."""
    hits = Counter(g for g, p in zip(gold, predicted, strict=True) if g == p)
    return statistics.fmean(2 * hits[tag] / (gold.count(tag) + predicted.count(tag))
                            for tag in sorted(set(gold) | set(predicted)))

def top_k_ndcg(ranked: list[list[int]], relevance: list[dict], k: int = 10) -> float:
    """EncodEval's nDCG@k (sklearn's ndcg_score) on the binary relevance of the k retrieved, ideal
    from those k alone: a missed relevant document costs nothing, none retrieved scores 0."""
    scores = []
    for docs, rel in zip(ranked, relevance, strict=True):
        if not any(g > 0 for g in rel.values()):
            continue
        gains = [float(rel.get(d, 0) > 0) for d in docs[:k]]
        ideal = sum(g / math.log2(r + 2) for r, g in enumerate(sorted(gains, reverse=True)))
        dcg = sum(g / math.log2(r + 2) for r, g in enumerate(gains))
        scores.append(dcg / ideal if ideal else 0.0)
    return statistics.fmean(scores)

# Student's t_{0.975, df} for df = 1..30, to 4 decimals; beyond, Cornish-Fisher is within 1e-4
T975 = [12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
        2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
        2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423]

def t975(df: int) -> float:
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)

def mean_ci(scores: list[float]) -> tuple[float, float | None]:
    """The mean and its 95% interval's half-width t_{0.975, n-1} * sd / sqrt(n) (None if n = 1)."""
    if len(scores) < 2:
        return scores[0], None
    return (statistics.fmean(scores),
            t975(len(scores) - 1) * statistics.stdev(scores) / math.sqrt(len(scores)))
