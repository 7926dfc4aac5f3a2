"""
Fine-tune a pretraining checkpoint on one task and evaluate it the way the paper does.

    python finetune.py --init_from=out/demo/ckpt.pt --task=demo_sc                        # an offline demo task
    python finetune.py --init_from=ckpt.pt --task=sc --train=train.jsonl --test=dev.jsonl  # your own data
    python finetune.py --init_from=ckpt.pt --task=squad_v2       # a paper dataset (pip install datasets; network)
    python finetune.py --help                                                              # every setting

The protocol (the paper's): bidirectional attention whatever the pretraining objective (--causal=True is an ablation);
AdamW (0.9, 0.95), eps 1e-5, weight decay 0.1; 10% linear warmup, then linear decay to 0; batch 32; at most 1,000
steps or one epoch, whichever is smaller; 5% of the training file held out as validation; the test file is the
dataset's official validation split. Every (learning rate, seed) cell of the grid is fine-tuned from the same
checkpoint and appended to out_dir/results.jsonl as soon as it finishes, so an interrupted sweep restarts where it
stopped. The report (printed, and out_dir/report.json) gives per learning rate the seed mean and its 95% confidence
interval, the learning rate chosen on validation with its test score, and the stability figure.

Task files are JSON lines, one example per line:

  sc  sequence classification   {"text": str, "text_pair": str (sentence-pair tasks only), "label": str | int}
  tc  token classification      {"words": [str, ...], "tags": [str, ...]}, one BIO tag per word: "O", "B-PER", "I-PER"
  qa  extractive QA             {"id": str, "question": str, "context": str,
                                 "answers": {"text": [str, ...], "answer_start": [int, ...]}}
                                answer_start is a character offset into context; empty lists = unanswerable (SQuAD v2)
  ir  retrieval                 {"query": str, "document": str, "grade": number (optional, default 1)}
                                one line per judged (query, document) pair; lines with the same query text are one
                                query. grade > 0 is relevant (higher = more relevant), 0 a judged non-relevant document.
                                Training uses the relevant pairs; evaluation ranks, for each query, every distinct
                                document of its split (plus, for the test split, those of --corpus: {"text": str}).

Metrics, each in points (0-100): sc accuracy; tc entity F1 (conlleval); qa SQuAD F1 (and exact match); ir nDCG@10
(and MRR@10). Named tasks: the paper's datasets through the optional `datasets` package (HF_TASKS below), and one
offline demo task per family built from docstrings that pretraining never saw (demo_task below) - those are for
trying the pipeline, not for comparison with the paper.
"""

import glob
import hashlib
import json
import math
import os
import re
import statistics
import string
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import files
from model import configure_optimizer, load_checkpoint, load_hf, read_checkpoint
from train import TrainConfig, configure, data_dir_of, device_and_autocast, switch_step


@dataclass
class FinetuneConfig:
    # what to fine-tune, on what
    init_from: str = ""  # pretraining checkpoint (train.py writes out_dir/ckpt.pt); required
    task: str = "demo_sc"  # sc/tc/qa/ir (with --train, --test), demo_sc/tc/qa/ir (offline), or a dataset of HF_TASKS
    train: str = ""  # JSONL training file for sc|tc|qa|ir; val_fraction of it is held out as validation
    test: str = ""  # JSONL test file for sc|tc|qa|ir (the paper: the dataset's official validation split)
    corpus: str = ""  # ir only, optional: JSONL {"text": str} of extra documents ranked with the test split's
    out_dir: str = "out/finetune"  # results.jsonl (one line per finished cell) and report.json
    # the sweep
    lrs: str = "1e-5,2e-5,5e-5,1e-4,2e-4,5e-4"  # learning-rate grid, comma-separated (the paper's)
    seeds: int = 5  # seeds 0..seeds-1 at each learning rate (head init and batch order)
    # the protocol
    batch_size: int = 32  # examples per step (qa: context windows; ir: query-document pairs)
    max_steps: int = 1000  # step cap; training also stops after one epoch, whichever comes first
    warmup: float = 0.1  # fraction of the steps with linear warmup from 0, then linear decay to 0
    val_fraction: float = 0.05  # share of the training file held out (deterministically) to choose the learning rate
    weight_decay: float = 0.1  # AdamW, matrices only; betas (0.9, 0.95) and eps 1e-5 as in model.configure_optimizer
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    # the model
    causal: bool = False  # fine-tune with causal attention (an ablation: the paper is always bidirectional)
    pooling: str = "mean"  # sc/ir sequence vector: mean (real tokens only), first, or last (last real token)
    max_len: int = 512  # tokens per input, at most the checkpoint's block_size; longer inputs are cut (qa: windowed)
    doc_stride: int = 128  # qa: tokens shared by consecutive windows over a long context
    max_answer_tokens: int = 30  # qa: longest answer span considered at prediction
    temperature: float = 0.05  # ir: InfoNCE softmax temperature on cosine similarities
    # system
    device: str = "auto"  # "auto" (cuda, then mps, then cpu) or a torch device string
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on CUDA, as the paper; float32 elsewhere), bfloat16, float32
    progress: bool = True  # tqdm progress bars
    # summarising an experiment instead of fine-tuning
    summarize: str = ""  # a directory of train.py out_dirs, each with sweeps in subdirectories: print their table
    figures: str = ""  # with --summarize: directory for the two figures (needs matplotlib); "" = no figures


def learning_rates(cfg: FinetuneConfig) -> list[float]:
    try:
        lrs = [float(x) for x in cfg.lrs.split(",")]
    except ValueError:
        raise SystemExit(f"error: --lrs must be comma-separated numbers, got {cfg.lrs!r}") from None
    if not lrs or min(lrs) <= 0 or len(set(lrs)) != len(lrs):
        raise SystemExit(f"error: --lrs must be distinct positive numbers, got {cfg.lrs!r}")
    return lrs


def validate(cfg: FinetuneConfig):
    checks = [
        (cfg.init_from != "" or cfg.summarize != "", "--init_from (a pretraining checkpoint) is required"),
        (not cfg.figures or cfg.summarize, "--figures goes with --summarize"),
        (cfg.task in FAMILIES or cfg.task in HF_TASKS or cfg.task in [f"demo_{f}" for f in FAMILIES],
         f"--task must be one of {', '.join(FAMILIES)} (with --train/--test), "
         f"{', '.join('demo_' + f for f in FAMILIES)}, or {', '.join(HF_TASKS)}"),
        (cfg.task not in FAMILIES or (cfg.train and cfg.test), f"--task={cfg.task} needs --train and --test files"),
        (cfg.task in FAMILIES or not (cfg.train or cfg.test), "--train/--test are for --task=sc|tc|qa|ir only"),
        (not cfg.corpus or cfg.task in ("ir", "demo_ir", "msmarco"), "--corpus is for retrieval tasks only"),
        (cfg.seeds >= 1 and cfg.batch_size >= 1 and cfg.max_steps >= 1, "seeds, batch_size, max_steps must be >= 1"),
        (0 <= cfg.warmup < 1 and 0 < cfg.val_fraction < 1, "warmup must be in [0, 1), val_fraction in (0, 1)"),
        (cfg.grad_clip >= 0, "grad_clip must be >= 0 (0 = off; a negative bound would turn clipping into ascent)"),
        (cfg.pooling in ("mean", "first", "last"), "pooling must be mean, first or last"),
        (cfg.max_len >= 8 and cfg.max_answer_tokens >= 1 and cfg.doc_stride >= 0 and cfg.temperature > 0,
         "max_len >= 8, max_answer_tokens >= 1, doc_stride >= 0, temperature > 0"),
        (cfg.dtype in ("auto", "bfloat16", "float32"), "dtype must be auto, bfloat16 or float32"),
    ]
    problems = [message for ok, message in checks if not ok]
    if problems:
        raise SystemExit("error: " + "; ".join(problems))
    learning_rates(cfg)

# ----------------------------------------------------------------------------------------------------------------
# Metrics, written out. Each returns fractions; the report multiplies by 100.


def accuracy(predicted: list, gold: list) -> float:
    return sum(p == g for p, g in zip(predicted, gold, strict=True)) / len(gold)


def bio_entities(tags: list[str]) -> set[tuple[int, int, str]]:
    """(start, end exclusive, type) of the entities in one sentence's BIO tags, read as conlleval reads them: B-X
    starts an entity, and so does an I-X that does not continue an entity of type X (after O, or after another type)."""
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
    """Micro precision, recall and F1 over entities: a prediction counts only if its span and type both match."""
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
    """(exact match, token F1) of one prediction, the best over the gold answers, as SQuAD v2's script scores it:
    the empty string is the no-answer, and it scores 1 exactly when the question is unanswerable."""
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
    """The k best documents of each row of scores (queries, documents). Equal scores keep corpus order (a stable
    sort): the earlier document ranks first, so a ranking never depends on the sort implementation."""
    return torch.sort(scores.float().cpu(), dim=1, descending=True, stable=True).indices[:, :k].tolist()


def ndcg_mrr(ranked: list[list[int]], relevance: list[dict], k: int = 10) -> dict:
    """Mean nDCG@k with linear gain (grade / log2(rank + 1), trec_eval's and BEIR's convention) and MRR@k (1 / rank of
    the first document with grade > 0, 0 if none in the top k). Queries without a relevant document have no ideal
    ranking and are left out of both means, as BEIR does."""
    ndcgs, rrs = [], []
    for docs, rel in zip(ranked, relevance, strict=True):
        ideal = sorted((g for g in rel.values() if g > 0), reverse=True)[:k]
        if not ideal:
            continue
        dcg = sum(rel.get(d, 0) / math.log2(r + 2) for r, d in enumerate(docs[:k]))
        ndcgs.append(dcg / sum(g / math.log2(r + 2) for r, g in enumerate(ideal)))
        rrs.append(next((1 / (r + 1) for r, d in enumerate(docs[:k]) if rel.get(d, 0) > 0), 0.0))
    if not ndcgs:
        raise ValueError("no query has a relevant document (grade > 0)")
    return {f"ndcg@{k}": statistics.fmean(ndcgs), f"mrr@{k}": statistics.fmean(rrs)}


# t_{0.975, df} for df = 1..30 (Student's t, to 4 decimals); beyond, the Cornish-Fisher expansion is within 1e-4.
T975 = [12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
        2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
        2.0518, 2.0484, 2.0452, 2.0423]


def t975(df: int) -> float:
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_ci(scores: list[float]) -> tuple[float, float | None]:
    """The mean and the half-width of its 95% confidence interval, t_{0.975, n-1} * sd / sqrt(n) (None for n = 1)."""
    if len(scores) < 2:
        return scores[0], None
    return statistics.fmean(scores), t975(len(scores) - 1) * statistics.stdev(scores) / math.sqrt(len(scores))

# ----------------------------------------------------------------------------------------------------------------
# Tokens and the text they came from


def align_words(tok, words: list[str], max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of a pre-split sentence and the position of each word's first sub-token. Each word is encoded on its
    own, with the space that precedes it in running text (BPE tokens carry their leading space), so every token
    belongs to exactly one word. Words that do not fit in max_len are left out: only len(starts) words are kept."""
    ids, starts = [], []
    for i, word in enumerate(words):
        piece = tok.encode(word if i == 0 else " " + word)
        if len(ids) + len(piece) > max_len:
            if i == 0:  # one word longer than max_len: keep its first tokens, so the example still has a label
                ids, starts = piece[:max_len], [0]
            break
        starts.append(len(ids))
        ids += piece
    return ids, starts


def token_spans(tok, ids: list[int], text: str) -> list[tuple[int, int]]:
    """(start, end) character span in text of each token of text's encoding. A token that stops inside a multi-byte
    character gets an empty span at it; the token that completes the character spans it."""
    decoded, starts = tok.encoding.decode_with_offsets(ids)
    if decoded != text:
        raise ValueError(f"text does not survive encode/decode (invalid unicode?): {text[:60]!r}")
    return list(zip(starts, starts[1:] + [len(text)]))


def window_starts(n_tokens: int, room: int, stride: int) -> list[int]:
    """First token of each window of `room` tokens over a context of n_tokens, consecutive windows sharing `stride`
    tokens, the last one reaching the end."""
    starts = [0]
    while starts[-1] + room < n_tokens:
        starts.append(starts[-1] + room - stride)
    return starts


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, C) hidden states -> (B, C), inputs padded on the right; mask (B, T) is True on real tokens."""
    if how == "mean":
        m = mask.unsqueeze(-1).type_as(hidden)  # (B, T, 1)
        return (hidden * m).sum(1) / m.sum(1)
    if how == "first":
        return hidden[:, 0]
    return hidden[torch.arange(hidden.size(0), device=hidden.device), mask.sum(1) - 1]  # the last real token

# ----------------------------------------------------------------------------------------------------------------
# The four task families. Each checks its records, encodes them, builds its head and computes a loss and a metric.
# Records come as (where, dict) pairs; `where` ("train.jsonl, line 12") starts every error message about them.


def field(where: str, record: dict, name: str, kinds, what: str):
    value = record.get(name)
    if not isinstance(value, kinds) or isinstance(value, bool) or (isinstance(value, (str, list)) and not value):
        found = "missing" if name not in record else f"got {json.dumps(value)[:80]}"
        raise ValueError(f"{where}: field {name!r} must be {what} ({found})")
    return value


class Family:
    trivial_rule = None  # a constant prediction whose test score is worth printing next to the model's (sc and qa)

    def __init__(self, cfg: FinetuneConfig, tok, train: list, device, autocast, max_len: int):
        self.cfg, self.tok, self.device, self.autocast, self.max_len = cfg, tok, device, autocast, max_len
        self.setup(train)

    def forward(self, body, seqs: list[list[int]]):
        """Right-padded batch through the body: (hidden (B, T, C), mask (B, T) True on real tokens)."""
        lengths = torch.tensor([len(s) for s in seqs])
        idx = torch.full((len(seqs), int(lengths.max())), self.tok.pad_id, dtype=torch.long)  # (B, T)
        for i, s in enumerate(seqs):
            idx[i, :len(s)] = torch.tensor(s)
        mask = (torch.arange(idx.size(1)) < lengths[:, None]).to(self.device)  # (B, T)
        with self.autocast():
            hidden = body(idx.to(self.device), causal=self.cfg.causal, attention_mask=mask)
        return hidden.float(), mask  # the small heads and the losses run in float32, outside autocast

    def chunks(self, items: list):
        return (items[i:i + self.cfg.batch_size] for i in range(0, len(items), self.cfg.batch_size))


class SequenceClassification(Family):
    metric = "accuracy"

    def setup(self, train):
        self.pair, self.labels = "text_pair" in train[0][1], None  # the first training record decides: pairs or not
        self.check(train)
        self.labels = sorted({r["label"] for _, r in train}, key=lambda label: (isinstance(label, str), label))
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.majority = Counter(r["label"] for _, r in train).most_common(1)[0][0]

    def check(self, rows):
        for where, r in rows:
            field(where, r, "text", str, "a non-empty string")
            if self.pair:
                field(where, r, "text_pair", str, "a non-empty string: this is a sentence-pair task (the first "
                      "training record has text_pair), and every record needs both texts")
            elif "text_pair" in r:
                raise ValueError(f"{where}: field 'text_pair' given, but this is a single-text task (the first "
                                 f"training record has no text_pair)")
            label = field(where, r, "label", (str, int), "a string or an integer")
            if self.labels is not None and label not in self.index:
                raise ValueError(f"{where}: field 'label' is {label!r}, not one of the training labels {self.labels}")

    def encode(self, rows):
        ids = self.tok.encode_batch([r["text"] for _, r in rows])
        if self.pair:
            # The vocabulary has no [SEP]: end-of-text is the one boundary the model saw in pretraining (between
            # packed documents), so "a <eot> b" marks where b starts with an embedding that is already trained.
            seconds = self.tok.encode_batch([r["text_pair"] for _, r in rows])
            ids = [a + [self.tok.eot_id] + b for a, b in zip(ids, seconds)]
        return SimpleNamespace(items=[(s[:self.max_len], self.index[r["label"]]) for s, (_, r) in zip(ids, rows)])

    def head(self, n_embd):
        return nn.Linear(n_embd, len(self.labels))

    def logits(self, body, head, seqs):
        hidden, mask = self.forward(body, seqs)
        return head(pool(hidden, mask, self.cfg.pooling)).float()  # (B, n_labels)

    def loss(self, body, head, batch):
        seqs, labels = zip(*batch)
        return F.cross_entropy(self.logits(body, head, seqs), torch.tensor(labels, device=self.device))

    def evaluate(self, body, head, split):
        predicted = [p for chunk in self.chunks(split.items)
                     for p in self.logits(body, head, [s for s, _ in chunk]).argmax(-1).tolist()]
        return {"accuracy": accuracy(predicted, [y for _, y in split.items])}

    trivial_rule = "the most frequent training label"

    def trivial(self, split):
        return {"accuracy": accuracy([self.index[self.majority]] * len(split.items), [y for _, y in split.items])}


class TokenClassification(Family):
    metric = "f1"

    def setup(self, train):
        self.tags = None
        self.check(train)
        self.tags = ["O"] + sorted({t for _, r in train for t in r["tags"]} - {"O"})
        self.index = {t: i for i, t in enumerate(self.tags)}

    def check(self, rows):
        for where, r in rows:
            words = field(where, r, "words", list, "a non-empty list of words")
            tags = field(where, r, "tags", list, "a list of BIO tags, one per word")
            if len(tags) != len(words):
                raise ValueError(f"{where}: field 'tags' has {len(tags)} tags for {len(words)} words")
            for i, w in enumerate(words):
                if not isinstance(w, str) or not w.strip():
                    raise ValueError(f"{where}: field 'words' item {i} must be a non-empty string, got {w!r}")
            for i, t in enumerate(tags):
                if not isinstance(t, str) or not re.fullmatch(r"O|[BI]-\S+", t):
                    raise ValueError(f"{where}: field 'tags' item {i} is {t!r}, not a BIO tag (O, B-TYPE, I-TYPE)")
                if self.tags is not None and t not in self.index:
                    raise ValueError(f"{where}: field 'tags' item {i} is {t!r}, a tag the training file never uses")

    def encode(self, rows):
        items = []
        for _, r in rows:
            ids, starts = align_words(self.tok, r["words"], self.max_len)
            items.append((ids, starts, [self.index[t] for t in r["tags"]]))
        return SimpleNamespace(items=items)

    def head(self, n_embd):
        return nn.Linear(n_embd, len(self.tags))

    def loss(self, body, head, batch):
        hidden, _ = self.forward(body, [ids for ids, _, _ in batch])
        rows = [b for b, (_, starts, _) in enumerate(batch) for _ in starts]
        cols = [s for _, starts, _ in batch for s in starts]
        targets = [t for _, starts, tags in batch for t in tags[:len(starts)]]
        logits = head(hidden[rows, cols]).float()  # (N words, n_tags): a word's label sits on its first sub-token
        return F.cross_entropy(logits, torch.tensor(targets, device=self.device))

    def evaluate(self, body, head, split):
        gold, predicted = [], []
        for chunk in self.chunks(split.items):
            hidden, _ = self.forward(body, [ids for ids, _, _ in chunk])
            best = head(hidden).argmax(-1).tolist()  # (B, T)
            for b, (_, starts, tags) in enumerate(chunk):
                gold.append([self.tags[t] for t in tags])
                # words cut off by max_len get "O": their entities count as missed, never dropped from the score
                predicted.append([self.tags[best[b][s]] for s in starts] + ["O"] * (len(tags) - len(starts)))
        return entity_f1(gold, predicted)



class QuestionAnswering(Family):
    metric = "f1"

    def setup(self, train):
        self.check(train)
        # SQuAD v1 has no unanswerable question and its scorer expects an answer to each: a null answer is only
        # ever predicted when the training data has unanswerable questions (SQuAD v2).
        self.allow_null = any(not r["answers"]["text"] for _, r in train)
        self.trivial_rule = "always no answer" if self.allow_null else None
        self.max_question = self.max_len // 4
        room = self.max_len - self.max_question - 2  # the fewest context tokens a window holds
        self.stride = min(self.cfg.doc_stride, room // 2)
        if self.stride < self.cfg.doc_stride:
            print(f"note: doc_stride {self.cfg.doc_stride} -> {self.stride}: windows of {self.max_len} tokens keep "
                  f"as few as {room} context tokens, and consecutive windows must move forward")

    def check(self, rows):
        seen = {}
        for where, r in rows:
            qid = field(where, r, "id", str, "a non-empty string, unique in the file")
            if qid in seen:
                raise ValueError(f"{where}: field 'id' {qid!r} already used at {seen[qid]}")
            seen[qid] = where
            field(where, r, "question", str, "a non-empty string")
            context = field(where, r, "context", str, "a non-empty string")
            answers = field(where, r, "answers", dict, 'an object {"text": [...], "answer_start": [...]}')
            texts, starts = answers.get("text"), answers.get("answer_start")
            if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
                raise ValueError(f"{where}: field 'answers' needs lists 'text' and 'answer_start' of equal length")
            for i, (text, start) in enumerate(zip(texts, starts)):
                if not isinstance(text, str) or not text or not isinstance(start, int) or \
                        context[start:start + len(text)] != text or start < 0:
                    raise ValueError(f"{where}: field 'answers' item {i}: text {text!r} is not at character "
                                     f"answer_start={start!r} of the context")

    def encode(self, rows):
        """Each example becomes windows "question <eot> context piece <eot>". The null answer points at the final
        <eot>: as the last real token it sees the whole input under causal attention too, unlike BERT's position 0."""
        items, eot = [], self.tok.eot_id
        for _, r in rows:
            context, answers = r["context"], r["answers"]
            ctx = self.tok.encode(context)
            spans = token_spans(self.tok, ctx, context)
            question = self.tok.encode(r["question"])[:self.max_question]
            room = self.max_len - len(question) - 2
            example = (r["id"], context, spans, answers["text"])
            first = None
            if answers["text"]:  # train on the first answer (SQuAD's training files have exactly one)
                a = answers["answer_start"][0]
                b = a + len(answers["text"][0])
                first = (next(i for i, (_, e) in enumerate(spans) if e > a),
                         max(i for i, (s, _) in enumerate(spans) if s < b))
            for lo in window_starts(len(ctx), room, self.stride):
                hi = min(lo + room, len(ctx))
                ids = question + [eot] + ctx[lo:hi] + [eot]
                offset = len(question) + 1 - lo  # sequence position of context token i is i + offset
                if first and lo <= first[0] and first[1] < hi:
                    target = (first[0] + offset, first[1] + offset)
                else:  # no answer in this window (or at all): the null position
                    target = (len(ids) - 1, len(ids) - 1)
                items.append((ids, example, lo, hi, offset, target))
        return SimpleNamespace(items=items)

    def head(self, n_embd):
        return nn.Linear(n_embd, 2)

    def logits(self, body, head, seqs):
        hidden, mask = self.forward(body, seqs)
        logits = head(hidden).float().masked_fill(~mask.unsqueeze(-1), float("-inf"))  # padding is never an answer
        return logits[..., 0], logits[..., 1]  # start, end: (B, T) each

    def loss(self, body, head, batch):
        start, end = self.logits(body, head, [item[0] for item in batch])
        targets = torch.tensor([item[5] for item in batch], device=self.device)  # (B, 2)
        return (F.cross_entropy(start, targets[:, 0]) + F.cross_entropy(end, targets[:, 1])) / 2

    def predict(self, split, start_logits: list, end_logits: list) -> dict:
        """Answer text per example id from each window's start/end logits: the best span start <= end, at most
        max_answer_tokens long, inside the context, over all windows; "" when the null score (the lowest over the
        windows) beats it, SQuAD v2's rule."""
        best, null = {}, {}
        for (ids, (qid, context, spans, _), lo, hi, offset, _), s, e in zip(split.items, start_logits, end_logits):
            null[qid] = min(null.get(qid, float("inf")), float(s[len(ids) - 1] + e[len(ids) - 1]))
            n = hi - lo
            if n == 0:
                continue
            pos = slice(lo + offset, hi + offset)
            scores = s[pos, None] + e[None, pos]  # (n, n): the span from context token lo+i to lo+j
            allowed = torch.ones(n, n, dtype=torch.bool).triu() & ~torch.ones(n, n, dtype=torch.bool).triu(
                self.cfg.max_answer_tokens)  # 0 <= j - i < max_answer_tokens
            scores = scores.masked_fill(~allowed, float("-inf"))
            i, j = divmod(int(scores.argmax()), n)
            if qid not in best or scores[i, j] > best[qid][0]:
                best[qid] = (float(scores[i, j]), context[spans[lo + i][0]:spans[lo + j][1]].strip())
        return {qid: "" if self.allow_null and (qid not in best or null[qid] > best[qid][0]) else best[qid][1]
                for qid in null}

    def evaluate(self, body, head, split):
        starts, ends = [], []
        for chunk in self.chunks(split.items):
            s, e = self.logits(body, head, [item[0] for item in chunk])
            starts += list(s.cpu())
            ends += list(e.cpu())
        return self.score(split, self.predict(split, starts, ends))

    def score(self, split, predictions: dict) -> dict:
        gold = {qid: answers for _, (qid, _, _, answers), *_ in split.items}
        pairs = [squad_scores(predictions[qid], answers) for qid, answers in gold.items()]
        return {"f1": statistics.fmean(f for _, f in pairs), "exact": statistics.fmean(x for x, _ in pairs)}

    def trivial(self, split):
        return self.score(split, {item[1][0]: "" for item in split.items})


class Retrieval(Family):
    metric = "ndcg@10"

    def setup(self, train):
        self.check(train)

    def check(self, rows):
        judged = {}
        for where, r in rows:
            query = field(where, r, "query", str, "a non-empty string")
            document = field(where, r, "document", str, "a non-empty string")
            grade = r.get("grade", 1)
            if not isinstance(grade, (int, float)) or isinstance(grade, bool) or not grade >= 0:
                raise ValueError(f"{where}: field 'grade' must be a number >= 0 (got {json.dumps(grade)})")
            if (query, document) in judged:
                raise ValueError(f"{where}: this (query, document) pair is already judged at {judged[query, document]}")
            judged[query, document] = where

    def encode(self, rows, extra_documents=()):
        queries, documents, relevance = {}, {}, []  # text -> index, in order of first appearance
        for _, r in rows:
            q = queries.setdefault(r["query"], len(queries))
            d = documents.setdefault(r["document"], len(documents))
            if q == len(relevance):
                relevance.append({})
            relevance[q][d] = r.get("grade", 1)
        for text in extra_documents:
            documents.setdefault(text, len(documents))
        query_ids = [s[:self.max_len] for s in self.tok.encode_batch(list(queries))]
        document_ids = [s[:self.max_len] for s in self.tok.encode_batch(list(documents))]
        pairs = [(d, rel, query_ids[q], document_ids[d]) for q, rel in enumerate(relevance)
                 for d, grade in rel.items() if grade > 0]
        return SimpleNamespace(items=pairs, queries=query_ids, documents=document_ids, relevance=relevance)

    def head(self, n_embd):
        return nn.Identity()  # the paper's retriever is the pooled body alone

    def embed(self, body, seqs):
        hidden, mask = self.forward(body, seqs)
        return F.normalize(pool(hidden, mask, self.cfg.pooling).float(), dim=-1)  # (B, C), unit norm

    def loss(self, body, head, batch):
        d_index, relevance, q_ids, d_ids = zip(*batch)
        vectors = self.embed(body, list(q_ids) + list(d_ids))  # one pass for queries and documents: (2B, C)
        q, d = vectors[:len(batch)], vectors[len(batch):]
        scores = q @ d.T / self.cfg.temperature  # (B, B): row i's positive on the diagonal, the rest negatives...
        # ...except other columns whose document is relevant to row i's query too (the same document again, or
        # another positive of the same query): pushing those away would teach the wrong thing
        not_negative = torch.tensor([[i != j and rel.get(d, 0) > 0 for j, d in enumerate(d_index)]
                                     for i, rel in enumerate(relevance)], device=self.device)  # (B, B)
        scores = scores.masked_fill(not_negative, float("-inf"))
        return F.cross_entropy(scores, torch.arange(len(batch), device=self.device))

    def evaluate(self, body, head, split, k: int = 10):
        docs = torch.cat([self.embed(body, c) for c in self.chunks(split.documents)])  # (n_docs, C)
        ranked = [r for c in self.chunks(split.queries) for r in rank_documents(self.embed(body, c) @ docs.T, k)]
        return ndcg_mrr(ranked, split.relevance, k)


FAMILIES = {"sc": SequenceClassification, "tc": TokenClassification, "qa": QuestionAnswering, "ir": Retrieval}

# ----------------------------------------------------------------------------------------------------------------
# Task data: local files, the paper's datasets, the offline demo tasks


def read_jsonl(path: str) -> list[tuple[str, dict]]:
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    rows = []
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is reported with its number
        for n, line in enumerate(f, start=1):
            if line.strip():
                rows.append((f"{path}, line {n}", files.parse_json_line(path, n, line)))
    return rows


# --task name: (family, Hugging Face dataset, config, training split, test split = the official validation split)
HF_TASKS = {
    "sst2": ("sc", "nyu-mll/glue", "sst2", "train", "validation"),
    "mnli": ("sc", "nyu-mll/glue", "mnli", "train", "validation_matched"),
    "qqp": ("sc", "nyu-mll/glue", "qqp", "train", "validation"),
    "conll2003": ("tc", "eriktks/conll2003", None, "train", "validation"),
    "squad": ("qa", "rajpurkar/squad", None, "train", "validation"),
    "squad_v2": ("qa", "rajpurkar/squad_v2", None, "train", "validation"),
    "msmarco": ("ir", "microsoft/ms_marco", "v1.1", "train", "validation"),
}
GLUE_TEXTS = {"sst2": ("sentence",), "mnli": ("premise", "hypothesis"), "qqp": ("question1", "question2")}


def convert_hf(task: str, record: dict, tag_names: list[str] | None = None) -> list[dict]:
    """One Hugging Face record of a paper dataset -> our records (a list: an MS MARCO query gives one per passage)."""
    family = HF_TASKS[task][0]
    if family == "sc":
        texts = GLUE_TEXTS[task]
        out = {"text": record[texts[0]], "label": record["label"]}
        return [out | {"text_pair": record[texts[1]]}] if len(texts) == 2 else [out]
    if family == "tc":  # integer tags; their names come from the dataset's features
        return [{"words": list(record["tokens"]), "tags": [tag_names[t] for t in record["ner_tags"]]}]
    if family == "qa":
        answers = record["answers"]
        return [{"id": record["id"], "question": record["question"], "context": record["context"],
                 "answers": {"text": list(answers["text"]), "answer_start": list(answers["answer_start"])}}]
    passages = record["passages"]
    if not any(passages["is_selected"]):
        return []  # no relevant passage: nothing to learn from and no ideal ranking to score against
    return [{"query": record["query"], "document": text, "grade": int(selected)}
            for text, selected in zip(passages["passage_text"], passages["is_selected"])]


def load_hf_task(task: str) -> tuple[list, list]:
    try:
        import datasets  # optional: only the paper's datasets need it
    except ImportError:
        raise SystemExit(f"error: --task={task} needs the optional datasets package: pip install datasets") from None
    family, name, config, *splits = HF_TASKS[task]
    out = []
    for split in splits:
        ds = datasets.load_dataset(name, config, split=split)
        tag_names = ds.features["ner_tags"].feature.names if family == "tc" else None
        out.append([(f"{name}/{split}, record {i + 1}", rec) for i, r in enumerate(ds)
                    for rec in convert_hf(task, r, tag_names)])
    return out[0], out[1]


def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


# reST markup that marks code: ``literal``, :role:`target` and the default role `target`
CODE_MARKUP = re.compile(r"``(?P<literal>[^`]+?)``|:(?P<role>[\w:]+):`(?P<target>[^`]+)`"
                         r"|(?<![\w`])`(?P<default>[^`]+)`(?![\w`])")
PYTHON_ROLES = {"func", "meth", "class", "attr", "mod", "obj", "data", "const", "exc"}


def markup_to_bio(paragraph: str) -> tuple[list[str], list[str]]:
    """Strip the code markup of a reST paragraph into words with BIO tags: LIT for ``literals``, REF for references
    to Python objects (:func:`x`, :class:`x`, `x`); other roles (:math:, :ref:) become plain words."""
    words, tags, pos = [], [], 0

    def add(text, kind):
        for i, word in enumerate(text.split()):
            words.append(word)
            tags.append("O" if kind is None else ("B-" if i == 0 else "I-") + kind)

    for m in CODE_MARKUP.finditer(paragraph):
        add(paragraph[pos:m.start()], None)
        if m["literal"] is not None:
            add(m["literal"], "LIT")
        else:  # what Sphinx shows: the title of "title <target>", the last component of "~a.b.c"
            raw = m["target"] if m["target"] is not None else m["default"]
            shown = re.sub(r"\s*<[^>]*>$", "", raw) or raw
            shown = shown[1:].rsplit(".", 1)[-1] if shown.startswith("~") else shown.lstrip("!")
            add(shown, "REF" if m["default"] is not None or m["role"].split(":")[-1] in PYTHON_ROLES else None)
        pos = m.end()
    add(paragraph[pos:], None)
    return words, tags


def parameter_sections(text: str) -> list[tuple[int, int, list[tuple[str, int, int]]]]:
    """(start, end, parameters) of each numpydoc "Parameters" or Google-style "Args:" section of a docstring:
    text[start:end] is the section, header included; a parameter is (name, start, end), text[start:end] being the
    first sentence of its description."""
    lines = text.split("\n")
    line_start = [0]
    for line in lines:
        line_start.append(line_start[-1] + len(line) + 1)
    indent = lambda line: len(line) - len(line.lstrip())  # noqa: E731
    entry = re.compile(r"\s*(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)*)\s*(?:\([^)]*\))?\s*:(?P<rest>.*)")
    sections, i = [], 0
    while i < len(lines):
        numpy = lines[i].strip() == "Parameters" and i + 1 < len(lines) and re.fullmatch(r"\s*-{3,}", lines[i + 1])
        google = lines[i].strip() in ("Args:", "Arguments:")
        if not (numpy or google):
            i += 1
            continue
        # numpydoc entries sit at the header's indentation, Google ones one level deeper
        start, params, entry_indent = line_start[i], [], indent(lines[i]) if numpy else None
        i += 2 if numpy else 1
        while i < len(lines):
            if not lines[i].strip():
                i += 1
                continue
            entry_indent = indent(lines[i]) if entry_indent is None else entry_indent
            m = entry.fullmatch(lines[i])
            if indent(lines[i]) != entry_indent or not m:
                break  # the next section, or a dedent: the parameters are over
            j = i + 1  # the description: the deeper-indented lines below (and, Google-style, the rest of this one)
            while j < len(lines) and (not lines[j].strip() or indent(lines[j]) > entry_indent):
                j += 1
            end = line_start[j] - 1
            after = line_start[i] + m.start("rest") if google else line_start[i + 1]
            first = re.compile(r"\S").search(text, after, end)
            if first and "," not in m[1]:  # "x1, x2 : array_like" shares one description: no single answer
                sentence = re.match(r".+?(?:\.(?=\s)|$)", text[first.start():end], re.S)[0].rstrip()
                params.append((m[1], first.start(), first.start() + len(sentence)))
            i = j
        if params:
            sections.append((start, len(text[:line_start[i] - 1].rstrip()), params))
    return sections


def demo_records(family: str, docs) -> list[tuple[object, dict]]:
    """(document, record) pairs of the demo task of a family; see demo_task."""
    if family == "sc":
        return [(d, {"text": " ".join(paragraphs(d.text)[0].split()), "label": d.source}) for d in docs]
    if family == "tc":
        tagged = [(d, markup_to_bio(p)) for d in docs for p in paragraphs(d.text)]
        return [(d, {"words": words, "tags": tags}) for d, (words, tags) in tagged if set(tags) - {"O"}]
    if family == "ir":
        pairs = [(d, {"query": " ".join(ps[0].split()), "document": "\n\n".join(ps[1:])})
                 for d in docs if len(ps := paragraphs(d.text)) >= 2]
        counts = Counter(r["query"] for _, r in pairs)  # a summary shared by several docstrings ("Deprecated.")
        return [(d, r) for d, r in pairs if counts[r["query"]] == 1]  # does not single out one body: left out
    with_params, used = [], set()
    for d in docs:  # a section copied into several docstrings is used once: never in both train and test
        sections = parameter_sections(d.text)
        if sections and (section := d.text[sections[0][0]:sections[0][1]]) not in used:
            used.add(section)
            with_params.append((d, sections[0]))
    out = []
    for n, (d, (start, end, params)) in enumerate(with_params):
        context, seen = d.text[start:end], set()
        for name, s, e in params:
            if name not in seen:  # a name documented twice (overloads): the first description answers
                seen.add(name)
                out.append((d, {"id": f"{d.module}:{d.name}:{name}", "question": f"What is {name}?",
                                "context": context, "answers": {"text": [d.text[s:e]], "answer_start": [s - start]}}))
        _, (_, _, next_params) = with_params[(n + 1) % len(with_params)]
        absent = [name for name, _, _ in next_params if not re.search(rf"(?<!\w){re.escape(name)}(?!\w)", context)]
        if absent:
            out.append((d, {"id": f"{d.module}:{d.name}:{absent[0]}", "question": f"What is {absent[0]}?",
                            "context": context, "answers": {"text": [], "answer_start": []}}))
    return out


def demo_task(family: str, data_dir: str = "") -> tuple[list[dict], list[dict]]:
    """(train, test) records of the offline demo task of a family, built from held-out docstrings and split by
    document (a stable hash of module and name: about 75% train, 25% test), so no docstring is in both:
      sc: which package (stdlib, numpy, torch) a docstring's summary paragraph comes from;
      tc: the code spans reST markup marks in a paragraph, markup stripped: LIT ``literal``, REF :func:`reference`;
      qa: "What is <param>?" answered by the first sentence of the parameter's description, the context being the
          docstring's parameter section (numpydoc "Parameters" or Google "Args:"); per section also one unanswerable
          question, about a parameter of the next docstring's section that this one never mentions;
      ir: find a docstring's body (all but its first paragraph) from its summary paragraph.
    The docstrings are those data.split_of holds out of pretraining, read from data_dir when prepared there."""
    train, test = [], []
    for d, record in demo_records(family, data.heldout_documents(data_dir)):
        in_test = int(hashlib.sha256(f"demo:{d.module}:{d.name}".encode()).hexdigest()[:8], 16) < 2 ** 30
        (test if in_test else train).append(record)
    return train, test


def load_task(cfg: FinetuneConfig, data_dir: str = "") -> tuple[str, list, list, list]:
    """(family, train rows, test rows, extra ir documents); rows are (where, record) pairs. data_dir: the
    checkpoint's pretraining data, where the demo tasks find their held-out docstrings."""
    if cfg.task in FAMILIES:
        family, train, test = cfg.task, read_jsonl(cfg.train), read_jsonl(cfg.test)
    elif cfg.task in HF_TASKS:
        family, (train, test) = HF_TASKS[cfg.task][0], load_hf_task(cfg.task)
    else:
        family = cfg.task.removeprefix("demo_")
        train, test = ([(f"{cfg.task} {split}, record {i + 1}", r) for i, r in enumerate(records)]
                       for split, records in zip(("train", "test"), demo_task(family, data_dir)))
    for name, path, rows in (("training", cfg.train, train), ("test", cfg.test, test)):
        if not rows:
            raise ValueError(f"{path if cfg.task in FAMILIES else '--task=' + cfg.task}: the {name} split is empty")
    extra = [field(where, r, "text", str, "a non-empty string") for where, r in read_jsonl(cfg.corpus)] \
        if cfg.corpus else []
    return family, train, test, extra


def hold_out(rows: list, family: str, fraction: float) -> tuple[list, list]:
    """(train, validation): the validation rows are those whose stable hash ranks in the lowest `fraction` - the same
    for every seed and learning rate. Retrieval holds out whole queries; identical records always stay together."""
    def key(r):
        return r["query"] if family == "ir" else json.dumps(r, sort_keys=True)
    keys = sorted({key(r) for _, r in rows}, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
    if len(keys) < 2:
        raise ValueError(f"{rows[0][0]}: too few training examples to hold out a validation split")
    val = set(keys[:max(1, round(fraction * len(keys)))])
    return [row for row in rows if key(row[1]) not in val], [row for row in rows if key(row[1]) in val]

# ----------------------------------------------------------------------------------------------------------------
# One cell: fine-tune from the checkpoint at one learning rate and seed, then score validation and test


def lr_factor(step: int, steps: int, warmup_steps: int) -> float:
    """Linear warmup from 0 over warmup_steps, then linear decay reaching 0 right after the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return (steps - step) / (steps - warmup_steps)


def finetune_cell(family: Family, body, splits: dict, cfg: FinetuneConfig, lr: float, seed: int) -> dict:
    """Trains body (in place) and a new head; returns the scores of each split in `splits` other than "train"."""
    torch.manual_seed(seed)
    head = family.head(body.config.n_embd).to(family.device)
    both = nn.ModuleDict({"body": body, "head": head})
    optimizer = configure_optimizer(both, lr, cfg.weight_decay, device_type=family.device.type)
    items = splits["train"].items
    steps = min(cfg.max_steps, math.ceil(len(items) / cfg.batch_size))
    warmup_steps = math.ceil(cfg.warmup * steps)
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    both.train()
    diverged = None
    for step in tqdm(range(steps), desc=f"lr {lr:g} seed {seed}", leave=False, disable=not cfg.progress):
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, steps, warmup_steps)
        loss = family.loss(body, head, [items[i] for i in order[step * cfg.batch_size:(step + 1) * cfg.batch_size]])
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(both.parameters(), cfg.grad_clip or float("inf"))
        if not torch.isfinite(torch.stack([loss.detach(), grad_norm])).all():
            # A real outcome at a high learning rate: the update is not applied, and the cell is scored with the
            # weights of its last finite step. A finite loss can come with a non-finite gradient.
            diverged = step
            optimizer.zero_grad(set_to_none=True)  # the body is reused by the next cell
            break
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    both.eval()
    with torch.no_grad():
        scores = {name: {k: 100 * v for k, v in family.evaluate(body, head, split).items()}
                  for name, split in splits.items() if name != "train"}
    return {**scores, "steps": steps, "diverged_at": diverged}

# ----------------------------------------------------------------------------------------------------------------
# The sweep and its report


def read_results(path: str, key: str) -> dict:
    """(lr, seed) -> result of the cells already in path for this configuration (the key). The torn last line of a
    sweep killed mid-write is cut from the file; that cell is simply done again."""
    return {(r["lr"], r["seed"]): r for r in files.read_json_lines(path, repair=True) if r.get("key") == key}


def sweep(family: Family, body, splits: dict, cfg: FinetuneConfig, key: str) -> list[dict]:
    """Every (lr, seed) cell, from out_dir/results.jsonl when it is there with the same key, else fine-tuned now."""
    path = os.path.join(cfg.out_dir, "results.jsonl")
    done = read_results(path, key)
    cells = [(lr, seed) for lr in learning_rates(cfg) for seed in range(cfg.seeds)]
    todo = [cell for cell in cells if cell not in done]
    print(f"{len(cells) - len(todo)} of {len(cells)} cells already in {path}; fine-tuning {len(todo)}")
    initial = {k: v.detach().clone() for k, v in body.state_dict().items()}
    for lr, seed in tqdm(todo, desc="cells", disable=not cfg.progress):
        body.load_state_dict(initial)
        t0 = time.perf_counter()
        result = {"key": key, "lr": lr, "seed": seed, **finetune_cell(family, body, splits, cfg, lr, seed),
                  "seconds": round(time.perf_counter() - t0, 1)}
        with open(path, "a", encoding="utf-8") as f:
            f.write(files.json_line(result))
        done[lr, seed] = result
    body.load_state_dict(initial)
    return [done[cell] for cell in cells]


def report(results: list[dict], metric: str) -> dict:
    """Per learning rate: the seed mean of the validation and test scores with their 95% intervals. The chosen
    learning rate has the best mean validation score (the smaller one on a tie). Stability: the standard deviation
    (n - 1) across the learning rates of the grid of the seed-mean test score, in points - how far the score moves
    when the learning rate is mis-set; lower is more stable (the paper's finding 2: CLM-pretrained models move less)."""
    per_lr = []
    for lr in dict.fromkeys(r["lr"] for r in results):
        cells = [r for r in results if r["lr"] == lr]
        val_mean, val_ci = mean_ci([r["val"][metric] for r in cells])
        test_mean, test_ci = mean_ci([r["test"][metric] for r in cells])
        per_lr.append({"lr": lr, "seeds": len(cells), "val_mean": val_mean, "val_ci95": val_ci,
                       "test_mean": test_mean, "test_ci95": test_ci,
                       "diverged": sum(r["diverged_at"] is not None for r in cells)})
    chosen = max(per_lr, key=lambda row: (row["val_mean"], -row["lr"]))
    test_means = [row["test_mean"] for row in per_lr]
    return {"metric": metric, "per_lr": per_lr, "chosen_lr": chosen["lr"], "test_mean": chosen["test_mean"],
            "test_ci95": chosen["test_ci95"],
            "stability_sd": statistics.stdev(test_means) if len(test_means) > 1 else None}


def print_report(rep: dict):
    plus = lambda mean, ci: f"{mean:6.2f} ± {ci:5.2f}" if ci is not None else f"{mean:6.2f}        "  # noqa: E731
    print(f"\n{'lr':>8} {'seeds':>5}   {'val ' + rep['metric']:<15}   {'test ' + rep['metric']:<15}")
    for row in rep["per_lr"]:
        flag = f"  ({row['diverged']} diverged)" if row["diverged"] else ""
        print(f"{row['lr']:>8.1e} {row['seeds']:>5}   {plus(row['val_mean'], row['val_ci95'])}   "
              f"{plus(row['test_mean'], row['test_ci95'])}{flag}")
    ci = f" ± {rep['test_ci95']:.2f}" if rep["test_ci95"] is not None else ""
    print(f"chosen on validation: lr {rep['chosen_lr']:.1e}, test {rep['metric']} {rep['test_mean']:.2f}{ci} "
          f"(mean ± 95% CI over seeds)")
    if rep["stability_sd"] is not None:
        print(f"stability: sd of the seed-mean test score across the lr grid = {rep['stability_sd']:.2f} points")
    if "trivial" in rep:
        print(f"a constant prediction ({rep['trivial']['rule']}) scores {rep['trivial']['test']:.2f} on test")


# ----------------------------------------------------------------------------------------------------------------
# An experiment: several pretraining runs, each fine-tuned on several tasks, in one table and two figures


def read_run(ckpt_path: str) -> dict:
    """A train.py run: its settings (from the checkpoint; mmap reads them without loading the weights), its
    validation losses, and the report.json of every sweep in a subdirectory of its out_dir."""
    run_dir = os.path.dirname(ckpt_path)
    ckpt = read_checkpoint(ckpt_path)
    if "train_config" not in ckpt:
        raise ValueError(f"{ckpt_path} has no train_config: not written by train.py")
    evals = [r for r in files.read_json_lines(os.path.join(run_dir, "log.jsonl")) if "val_clm" in r]
    reports = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "*", "report.json"))):
        with open(path) as f:
            rep = json.load(f)
        if os.path.realpath(rep["init_from"]) != os.path.realpath(ckpt_path):
            raise ValueError(f"{path} fine-tuned {rep['init_from']}, not this run's {ckpt_path}; move it out of "
                             f"{run_dir}")
        rep["cells"] = list(read_results(os.path.join(os.path.dirname(path), "results.jsonl"), rep["key"]).values())
        reports[rep["task"]] = rep
    return {"name": os.path.basename(run_dir), "ckpt": ckpt_path, "config": ckpt["train_config"], "evals": evals,
            "reports": reports}


def describe_runs(runs: list[dict]) -> list[dict]:
    """Each run's pretraining in words ("CLM 100 -> MLM 300"), its CPT source (the run whose checkpoint it started
    from, if any) and its share of CLM steps; sorted as the paper's tables are: CLM first, then more and more MLM,
    then continued pretraining."""
    by_ckpt = {os.path.realpath(r["ckpt"]): r for r in runs}
    for run in runs:
        cfg = TrainConfig(**run["config"])
        switch = switch_step(cfg)
        phases = [(cfg.objective, cfg.max_steps)] if switch is None else \
            [(cfg.objective, switch), (cfg.switch_to, cfg.max_steps - switch)]
        run["pretraining"] = " -> ".join(f"{objective.upper()} {steps}" for objective, steps in phases)
        run["clm_share"] = sum(steps for objective, steps in phases if objective == "clm") / cfg.max_steps
        run["source"] = None
        if cfg.init_from not in ("scratch", "resume"):
            source = by_ckpt.get(os.path.realpath(cfg.init_from))
            run["source"] = source
            run["pretraining"] = f"{source['name'] if source else cfg.init_from} + {run['pretraining']}"
    depth = lambda run: 0 if run["source"] is None else 1 + depth(run["source"])  # noqa: E731
    return sorted(runs, key=lambda run: (depth(run), -run["clm_share"], run["name"]))


def summary_tables(runs: list[dict]) -> tuple[list[str], str]:
    """The tasks, and two markdown tables: the test score at the learning rate chosen on validation (mean ± 95%
    CI over seeds) per run and task, as the paper reports; then the stability figure (sd across the learning-rate
    grid, points) and the final validation losses of pretraining."""
    tasks = sorted({t for run in runs for t in run["reports"]},
                   key=lambda t: (list(FAMILIES).index(next(r["reports"][t]["family"] for r in runs
                                                           if t in r["reports"])), t))
    metric = {t: next(r["reports"][t]["metric"] for r in runs if t in r["reports"]) for t in tasks}

    def row(cells):
        return "| " + " | ".join(cells) + " |"

    def mean_of(values):  # over every task, or none: a mean over fewer tasks would not compare with the others
        return "-" if not values or None in values else f"{statistics.mean(values):.2f}"

    scores = [row(["run", "pretraining"] + [f"{t} {metric[t]}" for t in tasks] + ["mean"]),
              row(["---"] * (len(tasks) + 3))]
    stability = [row(["run"] + [t for t in tasks] + ["mean", "final val CLM", "final val MLM"]),
                 row(["---"] * (len(tasks) + 4))]
    for run in runs:
        reps = [run["reports"].get(t) for t in tasks]
        scores.append(row([run["name"], run["pretraining"]]
                          + [("-" if rep is None else f"{rep['test_mean']:.2f}"
                              + (f" ± {rep['test_ci95']:.2f}" if rep["test_ci95"] is not None else "")) for rep in reps]
                          + [mean_of([rep and rep["test_mean"] for rep in reps])]))
        sds = [rep and rep["stability_sd"] for rep in reps]
        last = run["evals"][-1] if run["evals"] else {}
        stability.append(row([run["name"]] + ["-" if sd is None else f"{sd:.2f}" for sd in sds] + [mean_of(sds)]
                             + [f"{last[k]:.4f}" if k in last else "-" for k in ("val_clm", "val_mlm")]))
    return tasks, "\n".join(scores) + "\n\n" + "\n".join(stability)


def draw_figures(runs: list[dict], tasks: list[str], out_dir: str) -> list[str]:
    """Two PNGs: the validation losses of both objectives over pretraining for every run (a continued-pretraining
    run drawn after its source's steps; a dotted line where the objective changes), and the test score against
    the learning rate per task: the seed mean as a line, each seed as a dot (with a few seeds, the dots say more
    than a t interval, which is wide)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: --figures needs matplotlib: pip install matplotlib") from None
    os.makedirs(out_dir, exist_ok=True)
    colors = {run["name"]: f"C{i}" for i, run in enumerate(runs)}

    def offset(run):  # the step a run's step 0 stands at: after everything its source ran
        return 0 if run["source"] is None else offset(run["source"]) + run["source"]["config"]["max_steps"]

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, key, title in zip(axes, ("val_clm", "val_mlm"), ("validation CLM loss", "validation MLM loss")):
        for run in runs:
            start = offset(run)
            ax.plot([start + e["step"] for e in run["evals"]], [e[key] for e in run["evals"]],
                    color=colors[run["name"]], label=f"{run['name']}: {run['pretraining']}")
            cfg = TrainConfig(**run["config"])
            changes = [start + s for s in (switch_step(cfg), 0 if run["source"] else None) if s is not None]
            for x in changes:
                ax.axvline(x, color=colors[run["name"]], linestyle=":", linewidth=1)
        ax.set(title=title, xlabel="pretraining step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (nats per token)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)  # below: curves fill both
    fig.tight_layout(rect=(0, 0.06 * math.ceil(len(runs) / 4), 1, 1))
    losses = os.path.join(out_dir, "experiment_losses.png")
    fig.savefig(losses, dpi=120)
    plt.close(fig)

    if not tasks:  # no sweeps yet: the losses are all there is to draw
        return [losses]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        reports = [(run, run["reports"][task]) for run in runs if task in run["reports"]]
        for run, rep in reports:
            ax.plot([row["lr"] for row in rep["per_lr"]], [row["test_mean"] for row in rep["per_lr"]],
                    color=colors[run["name"]], marker="o", label=run["name"])
            ax.scatter([c["lr"] for c in rep["cells"]], [c["test"][rep["metric"]] for c in rep["cells"]],
                       color=colors[run["name"]], s=10, alpha=0.4)
        ax.set(xscale="log", title=task, xlabel="fine-tuning learning rate", ylabel=f"test {reports[0][1]['metric']}")
        lrs = sorted({row["lr"] for _, rep in reports for row in rep["per_lr"]})
        ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    sweep_path = os.path.join(out_dir, "experiment_lr.png")
    fig.savefig(sweep_path, dpi=120)
    plt.close(fig)
    return [losses, sweep_path]


def summarize(cfg: FinetuneConfig) -> dict:
    """--summarize=DIR: the table (printed, and DIR/summary.md) and figures of every run in DIR."""
    paths = sorted(glob.glob(os.path.join(cfg.summarize, "*", "ckpt.pt")))
    if not paths:
        raise SystemExit(f"error: no run in {cfg.summarize}: expected train.py out_dirs {cfg.summarize}/<run>/ckpt.pt")
    try:
        runs = describe_runs([read_run(p) for p in paths])
    except KeyError as e:
        raise ValueError(f"a checkpoint or report.json under {cfg.summarize} lacks the field {e}: not written by "
                         "this project?") from None
    tasks, tables = summary_tables(runs)
    print(tables)
    files.write_text_atomically(os.path.join(cfg.summarize, "summary.md"), tables + "\n")
    figures = draw_figures(runs, tasks, cfg.figures) if cfg.figures else []
    for path in [os.path.join(cfg.summarize, "summary.md"), *figures]:
        print(f"wrote {path}")
    return {"runs": [run["name"] for run in runs], "tasks": tasks, "tables": tables, "figures": figures}


def main(argv: list[str]) -> dict:
    cfg = configure(FinetuneConfig, argv)
    validate(cfg)
    try:
        return summarize(cfg) if cfg.summarize else finetune(cfg)
    except (ValueError, OSError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None


def finetune(cfg: FinetuneConfig) -> dict:
    device, autocast = device_and_autocast(cfg.device, cfg.dtype)
    if cfg.init_from.startswith("hf:"):  # a Hugging Face decoder as it is, with its own tokenizer
        tok = data.get_tokenizer(cfg.init_from)
        body, ckpt = load_hf(cfg.init_from.removeprefix("hf:"), tok).to(device), {}
    else:
        body, ckpt = load_checkpoint(cfg.init_from, device)
        if "tokenizer" not in ckpt:
            raise ValueError(f"{cfg.init_from} has no tokenizer description (key 'tokenizer'): not from train.py?")
        tok = data.get_tokenizer(ckpt["tokenizer"]["tokenizer"])
        data.check_tokenizer(tok.meta(), ckpt["tokenizer"], cfg.init_from, f"the tokenizer {tok.name} here")
    data_dir = data_dir_of(ckpt["train_config"]) if "train_config" in ckpt else ""  # hf: bodies have none
    family_name, train, test, extra = load_task(cfg, data_dir)
    max_len = min(cfg.max_len, body.config.block_size)
    family = FAMILIES[family_name](cfg, tok, train, device, autocast, max_len)
    family.check(test)
    train, val = hold_out(train, family_name, cfg.val_fraction)
    splits = {"train": family.encode(train), "val": family.encode(val),
              "test": family.encode(test, extra) if extra else family.encode(test)}
    print(f"{cfg.task} ({family_name}): {len(train):,} train / {len(val):,} validation / {len(test):,} test records"
          f" -> {len(splits['train'].items):,} training items; body {cfg.init_from} on {device}, max_len {max_len}")
    del ckpt  # the body holds the weights
    # A cell is only reused when everything that decides its result is the same: settings, checkpoint and data.
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("lrs", "seeds", "out_dir", "device", "progress")}
    stat = os.stat(cfg.init_from.removeprefix("hf:"))
    fingerprint = json.dumps([settings, stat.st_size, stat.st_mtime_ns, train, test, extra], sort_keys=True)
    key = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    # One sweep at a time in an out_dir: two would do the same cells twice and interleave results.jsonl.
    with files.exclusive(os.path.join(cfg.out_dir, ".lock"), f"fine-tuning in {cfg.out_dir}"):
        results = sweep(family, body, splits, cfg, key)
        rep = {"task": cfg.task, "family": family_name, "init_from": cfg.init_from, "key": key,
               **report(results, family.metric)}
        if family.trivial_rule:
            rep["trivial"] = {"rule": family.trivial_rule, "test": 100 * family.trivial(splits["test"])[family.metric]}
        rep["settings"] = asdict(cfg)
        print_report(rep)
        path = os.path.join(cfg.out_dir, "report.json")
        files.write_text_atomically(path, json.dumps(files.strict(rep), indent=1))
    print(f"wrote {path}")
    return rep


if __name__ == "__main__":
    main(sys.argv[1:])
