"""
The paper's four task families, each a head on the pretrained body with its loss and its metric:

  sc  sequence classification   pooled hidden states + linear          accuracy
  tc  token classification      linear on each word's first sub-token  entity F1 (conlleval)
  qa  extractive QA             start/end logits per token             SQuAD F1 (and exact match)
  ir  retrieval                 pooled, L2-normalised embedding        nDCG@10 (and MRR@10)

Each family checks its records (task_data.py reads them), encodes them into token ids, builds its
head and computes a loss and a metric. Records come as (where, dict) pairs; `where`
("train.jsonl, line 12") starts every error message about them. finetune.py trains and sweeps.
"""

import json
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field as dataclass_field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from metrics import accuracy, entity_f1, ndcg_mrr, rank_documents, squad_scores

# --------------------------------------------------------------------------------------------------
# Tokens and the text they came from


def align_words(tok, words: list[str], max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of a pre-split sentence and the position of each word's first sub-token. Each word
    is encoded on its own, with the space that precedes it in running text (BPE tokens carry their
    leading space), so every token belongs to exactly one word. Words that do not fit in max_len are
    left out: only len(starts) words are kept."""
    ids, starts = [], []
    for i, word in enumerate(words):
        piece = tok.encode(word if i == 0 else " " + word)
        if len(ids) + len(piece) > max_len:
            # one word longer than max_len: keep its first tokens,
            # so the example still has a label
            if i == 0:
                ids, starts = piece[:max_len], [0]
            break
        starts.append(len(ids))
        ids += piece
    return ids, starts


def token_spans(tok, ids: list[int], text: str) -> list[tuple[int, int]]:
    """(start, end) character span in text of each token of text's encoding. A token that stops
    inside a multi-byte character gets an empty span at it; the token that completes the
    character spans it."""
    decoded, starts = tok.encoding.decode_with_offsets(ids)
    if decoded != text:
        raise ValueError(f"text does not survive encode/decode (invalid unicode?): {text[:60]!r}")
    return list(zip(starts, starts[1:] + [len(text)]))


def window_starts(n_tokens: int, room: int, stride: int) -> list[int]:
    """First token of each window of `room` tokens over a context of n_tokens, consecutive windows
    sharing `stride` tokens, the last one reaching the end."""
    starts = [0]
    while starts[-1] + room < n_tokens:
        starts.append(starts[-1] + room - stride)
    return starts


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, C) hidden states -> (B, C), inputs padded on the right;
    mask (B, T) is True on real tokens."""
    if how == "mean":
        m = mask.unsqueeze(-1).type_as(hidden)  # (B, T, 1)
        return (hidden * m).sum(1) / m.sum(1)
    if how == "first":
        return hidden[:, 0]
    # the last real token
    return hidden[torch.arange(hidden.size(0), device=hidden.device), mask.sum(1) - 1]

# --------------------------------------------------------------------------------------------------
# The four task families. Each checks its records, encodes them, builds its head and computes a loss
# and a metric. Records come as (where, dict) pairs; `where` ("train.jsonl, line 12") starts every
# error message about them.


def field(where: str, record: dict, name: str, kinds, what: str):
    value = record.get(name)
    if (not isinstance(value, kinds) or isinstance(value, bool)
            or (isinstance(value, (str, list)) and not value)):
        found = "missing" if name not in record else f"got {json.dumps(value)[:80]}"
        raise ValueError(f"{where}: field {name!r} must be {what} ({found})")
    return value


# What a family's encode() turns records into: a Split of items, one per training example (a QA
# example with a long context gives several windows).


class Labelled(NamedTuple):
    """sc: a sequence and its label index."""
    ids: list[int]
    label: int


class Tagged(NamedTuple):
    """tc: a sentence's tokens, where each kept word's first sub-token is, each word's tag index."""
    ids: list[int]
    starts: list[int]
    tags: list[int]


class QAExample(NamedTuple):
    """qa: what scoring a question needs: its id, its context, the character span of each context
    token, and the gold answers."""
    id: str
    context: str
    spans: list[tuple[int, int]]
    answers: list[str]


class QAWindow(NamedTuple):
    """qa: one window over an example's context: its input ids, the context tokens lo..hi it holds
    (context token i sits at position i + offset), and the target (start, end) positions."""
    ids: list[int]
    example: QAExample
    lo: int
    hi: int
    offset: int
    target: tuple[int, int]


class QueryDocument(NamedTuple):
    """ir: a relevant (query, document) pair for training, with the query's relevance judgments."""
    document: int  # index of the document in the split
    relevance: dict  # the query's judgments: document index -> grade
    query_ids: list[int]
    document_ids: list[int]


@dataclass
class Split:
    items: list  # the examples above, in order
    # ir only: every query and document of the split, and each query's judgments
    queries: list = dataclass_field(default_factory=list)
    documents: list = dataclass_field(default_factory=list)
    relevance: list = dataclass_field(default_factory=list)


class Family:
    # a constant prediction whose test score is worth printing next to the model's (sc and qa)
    trivial_rule = None

    def __init__(self, cfg, tok, train: list, device, autocast, max_len: int):
        self.cfg, self.tok, self.device, self.autocast, self.max_len = \
            cfg, tok, device, autocast, max_len
        self.setup(train)

    def forward(self, body, seqs: list[list[int]]):
        """Right-padded batch through the body:
        (hidden (B, T, C), mask (B, T) True on real tokens)."""
        lengths = torch.tensor([len(s) for s in seqs])
        idx = torch.full((len(seqs), int(lengths.max())), self.tok.pad_id,
                         dtype=torch.long)  # (B, T)
        for i, s in enumerate(seqs):
            idx[i, :len(s)] = torch.tensor(s)
        mask = (torch.arange(idx.size(1)) < lengths[:, None]).to(self.device)  # (B, T)
        with self.autocast():
            hidden = body(idx.to(self.device), causal=self.cfg.causal, attention_mask=mask)
        # the small heads and the losses run in float32, outside autocast
        return hidden.float(), mask

    def chunks(self, items: list):
        return (items[i:i + self.cfg.batch_size] for i in range(0, len(items), self.cfg.batch_size))


class SequenceClassification(Family):
    metric = "accuracy"

    def setup(self, train):
        # the first training record decides: pairs or not
        self.pair, self.labels = "text_pair" in train[0][1], None
        self.check(train)
        self.labels = sorted({r["label"] for _, r in train},
                             key=lambda label: (isinstance(label, str), label))
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.majority = Counter(r["label"] for _, r in train).most_common(1)[0][0]

    def check(self, rows):
        for where, r in rows:
            field(where, r, "text", str, "a non-empty string")
            if self.pair:
                field(where, r, "text_pair", str,
                      "a non-empty string: this is a sentence-pair task (the first training "
                      "record has text_pair), and every record needs both texts")
            elif "text_pair" in r:
                raise ValueError(f"{where}: field 'text_pair' given, but this is a single-text "
                                 f"task (the first training record has no text_pair)")
            label = field(where, r, "label", (str, int), "a string or an integer")
            if self.labels is not None and label not in self.index:
                raise ValueError(f"{where}: field 'label' is {label!r}, not one of the training "
                                 f"labels {self.labels}")

    def encode(self, rows):
        ids = self.tok.encode_batch([r["text"] for _, r in rows])
        if self.pair:
            # The vocabulary has no [SEP]: end-of-text is the one boundary the model saw in
            # pretraining (between packed documents), so "a <eot> b" marks where b starts with an
            # embedding that is already trained.
            seconds = self.tok.encode_batch([r["text_pair"] for _, r in rows])
            ids = [a + [self.tok.eot_id] + b for a, b in zip(ids, seconds)]
        return Split([Labelled(s[:self.max_len], self.index[r["label"]])
                      for s, (_, r) in zip(ids, rows)])

    def head(self, n_embd):
        return nn.Linear(n_embd, len(self.labels))

    def logits(self, body, head, seqs):
        hidden, mask = self.forward(body, seqs)
        return head(pool(hidden, mask, self.cfg.pooling)).float()  # (B, n_labels)

    def loss(self, body, head, batch):
        return F.cross_entropy(self.logits(body, head, [item.ids for item in batch]),
                               torch.tensor([item.label for item in batch], device=self.device))

    def evaluate(self, body, head, split):
        predicted = [p for chunk in self.chunks(split.items) for p in
                     self.logits(body, head, [item.ids for item in chunk]).argmax(-1).tolist()]
        return {"accuracy": accuracy(predicted, [item.label for item in split.items])}

    trivial_rule = "the most frequent training label"

    def trivial(self, split):
        return {"accuracy": accuracy([self.index[self.majority]] * len(split.items),
                                     [item.label for item in split.items])}


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
                raise ValueError(f"{where}: field 'tags' has {len(tags)} tags for "
                                 f"{len(words)} words")
            for i, w in enumerate(words):
                if not isinstance(w, str) or not w.strip():
                    raise ValueError(f"{where}: field 'words' item {i} must be a non-empty string, "
                                     f"got {w!r}")
            for i, t in enumerate(tags):
                if not isinstance(t, str) or not re.fullmatch(r"O|[BI]-\S+", t):
                    raise ValueError(f"{where}: field 'tags' item {i} is {t!r}, not a BIO tag "
                                     f"(O, B-TYPE, I-TYPE)")
                if self.tags is not None and t not in self.index:
                    raise ValueError(f"{where}: field 'tags' item {i} is {t!r}, a tag the training "
                                     f"file never uses")

    def encode(self, rows):
        items = []
        for _, r in rows:
            ids, starts = align_words(self.tok, r["words"], self.max_len)
            items.append(Tagged(ids, starts, [self.index[t] for t in r["tags"]]))
        return Split(items)

    def head(self, n_embd):
        return nn.Linear(n_embd, len(self.tags))

    def loss(self, body, head, batch):
        hidden, _ = self.forward(body, [item.ids for item in batch])
        rows = [b for b, item in enumerate(batch) for _ in item.starts]
        cols = [s for item in batch for s in item.starts]
        targets = [t for item in batch for t in item.tags[:len(item.starts)]]
        # (N words, n_tags): a word's label sits on its first sub-token
        logits = head(hidden[rows, cols]).float()
        return F.cross_entropy(logits, torch.tensor(targets, device=self.device))

    def evaluate(self, body, head, split):
        gold, predicted = [], []
        for chunk in self.chunks(split.items):
            hidden, _ = self.forward(body, [item.ids for item in chunk])
            best = head(hidden).argmax(-1).tolist()  # (B, T)
            for b, item in enumerate(chunk):
                gold.append([self.tags[t] for t in item.tags])
                # words cut off by max_len get "O":
                # their entities count as missed, never dropped from the score
                predicted.append([self.tags[best[b][s]] for s in item.starts]
                                 + ["O"] * (len(item.tags) - len(item.starts)))
        return entity_f1(gold, predicted)



class QuestionAnswering(Family):
    metric = "f1"

    def setup(self, train):
        self.check(train)
        # SQuAD v1 has no unanswerable question and its scorer expects an answer to each:
        # a null answer is only ever predicted when the training data has unanswerable
        # questions (SQuAD v2).
        self.allow_null = any(not r["answers"]["text"] for _, r in train)
        self.trivial_rule = "always no answer" if self.allow_null else None
        self.max_question = self.max_len // 4
        room = self.max_len - self.max_question - 2  # the fewest context tokens a window holds
        self.stride = min(self.cfg.doc_stride, room // 2)
        if self.stride < self.cfg.doc_stride:
            print(f"note: doc_stride {self.cfg.doc_stride} -> {self.stride}: windows of "
                  f"{self.max_len} tokens keep as few as {room} context tokens, and consecutive "
                  f"windows must move forward")

    def check(self, rows):
        seen = {}
        for where, r in rows:
            qid = field(where, r, "id", str, "a non-empty string, unique in the file")
            if qid in seen:
                raise ValueError(f"{where}: field 'id' {qid!r} already used at {seen[qid]}")
            seen[qid] = where
            field(where, r, "question", str, "a non-empty string")
            context = field(where, r, "context", str, "a non-empty string")
            answers = field(where, r, "answers", dict,
                            'an object {"text": [...], "answer_start": [...]}')
            texts, starts = answers.get("text"), answers.get("answer_start")
            if not isinstance(texts, list) or not isinstance(starts, list) or \
                    len(texts) != len(starts):
                raise ValueError(f"{where}: field 'answers' needs lists 'text' and 'answer_start' "
                                 f"of equal length")
            for i, (text, start) in enumerate(zip(texts, starts)):
                if not isinstance(text, str) or not text or not isinstance(start, int) or \
                        context[start:start + len(text)] != text or start < 0:
                    raise ValueError(f"{where}: field 'answers' item {i}: text {text!r} is not at "
                                     f"character answer_start={start!r} of the context")

    def encode(self, rows):
        """Each example becomes windows "question <eot> context piece <eot>". The null answer points
        at the final <eot>: as the last real token it sees the whole input under causal attention
        too, unlike BERT's position 0."""
        items, eot = [], self.tok.eot_id
        for _, r in rows:
            context, answers = r["context"], r["answers"]
            ctx = self.tok.encode(context)
            spans = token_spans(self.tok, ctx, context)
            question = self.tok.encode(r["question"])[:self.max_question]
            room = self.max_len - len(question) - 2
            example = QAExample(r["id"], context, spans, answers["text"])
            first = None
            # train on the first answer (SQuAD's training files have exactly one)
            if answers["text"]:
                a = answers["answer_start"][0]
                b = a + len(answers["text"][0])
                first = (next(i for i, (_, e) in enumerate(spans) if e > a),
                         max(i for i, (s, _) in enumerate(spans) if s < b))
            for lo in window_starts(len(ctx), room, self.stride):
                hi = min(lo + room, len(ctx))
                ids = question + [eot] + ctx[lo:hi] + [eot]
                # sequence position of context token i is i + offset
                offset = len(question) + 1 - lo
                if first and lo <= first[0] and first[1] < hi:
                    target = (first[0] + offset, first[1] + offset)
                else:  # no answer in this window (or at all): the null position
                    target = (len(ids) - 1, len(ids) - 1)
                items.append(QAWindow(ids, example, lo, hi, offset, target))
        return Split(items)

    def head(self, n_embd):
        return nn.Linear(n_embd, 2)

    def logits(self, body, head, seqs):
        hidden, mask = self.forward(body, seqs)
        # padding is never an answer
        logits = head(hidden).float().masked_fill(~mask.unsqueeze(-1), float("-inf"))
        return logits[..., 0], logits[..., 1]  # start, end: (B, T) each

    def loss(self, body, head, batch):
        start, end = self.logits(body, head, [item.ids for item in batch])
        targets = torch.tensor([item.target for item in batch], device=self.device)  # (B, 2)
        return (F.cross_entropy(start, targets[:, 0]) + F.cross_entropy(end, targets[:, 1])) / 2

    def predict(self, split, start_logits: list, end_logits: list) -> dict:
        """Answer text per example id from each window's start/end logits: the best span
        start <= end, at most max_answer_tokens long, inside the context, over all windows; "" when
        the null score (the lowest over the windows) beats it, SQuAD v2's rule."""
        best, null = {}, {}
        for item, s, e in zip(split.items, start_logits, end_logits):
            qid, spans, last, lo = item.example.id, item.example.spans, len(item.ids) - 1, item.lo
            null[qid] = min(null.get(qid, float("inf")), float(s[last] + e[last]))
            n = item.hi - lo
            if n == 0:
                continue
            pos = slice(lo + item.offset, item.hi + item.offset)
            scores = s[pos, None] + e[None, pos]  # (n, n): the span from context token lo+i to lo+j
            # 0 <= j - i < max_answer_tokens
            allowed = (torch.ones(n, n, dtype=torch.bool).triu()
                       & ~torch.ones(n, n, dtype=torch.bool).triu(self.cfg.max_answer_tokens))
            scores = scores.masked_fill(~allowed, float("-inf"))
            i, j = divmod(int(scores.argmax()), n)
            if qid not in best or scores[i, j] > best[qid][0]:
                best[qid] = (float(scores[i, j]),
                             item.example.context[spans[lo + i][0]:spans[lo + j][1]].strip())
        return {qid: "" if self.allow_null and (qid not in best or null[qid] > best[qid][0])
                else best[qid][1] for qid in null}

    def evaluate(self, body, head, split):
        starts, ends = [], []
        for chunk in self.chunks(split.items):
            s, e = self.logits(body, head, [item.ids for item in chunk])
            starts += list(s.cpu())
            ends += list(e.cpu())
        return self.score(split, self.predict(split, starts, ends))

    def score(self, split, predictions: dict) -> dict:
        gold = {item.example.id: item.example.answers for item in split.items}
        pairs = [squad_scores(predictions[qid], answers) for qid, answers in gold.items()]
        return {"f1": statistics.fmean(f for _, f in pairs),
                "exact": statistics.fmean(x for x, _ in pairs)}

    def trivial(self, split):
        return self.score(split, {item.example.id: "" for item in split.items})


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
                raise ValueError(f"{where}: field 'grade' must be a number >= 0 "
                                 f"(got {json.dumps(grade)})")
            if (query, document) in judged:
                raise ValueError(f"{where}: this (query, document) pair is already judged at "
                                 f"{judged[query, document]}")
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
        pairs = [QueryDocument(d, rel, query_ids[q], document_ids[d])
                 for q, rel in enumerate(relevance) for d, grade in rel.items() if grade > 0]
        return Split(pairs, query_ids, document_ids, relevance)

    def head(self, n_embd):
        return nn.Identity()  # the paper's retriever is the pooled body alone

    def embed(self, body, seqs):
        hidden, mask = self.forward(body, seqs)
        # (B, C), unit norm
        return F.normalize(pool(hidden, mask, self.cfg.pooling).float(), dim=-1)

    def loss(self, body, head, batch):
        # one pass for queries and documents: (2B, C)
        vectors = self.embed(body, [item.query_ids for item in batch]
                             + [item.document_ids for item in batch])
        q, d = vectors[:len(batch)], vectors[len(batch):]
        # (B, B): row i's positive on the diagonal, the rest negatives...
        scores = q @ d.T / self.cfg.temperature
        # ...except other columns whose document is relevant to row i's query too (the same
        # document again, or another positive of the same query): pushing those away would teach
        # the wrong thing
        not_negative = torch.tensor([[i != j and row.relevance.get(column.document, 0) > 0
                                      for j, column in enumerate(batch)]
                                     for i, row in enumerate(batch)], device=self.device)  # (B, B)
        scores = scores.masked_fill(not_negative, float("-inf"))
        return F.cross_entropy(scores, torch.arange(len(batch), device=self.device))

    def evaluate(self, body, head, split, k: int = 10):
        docs = torch.cat([self.embed(body, c) for c in self.chunks(split.documents)])  # (n_docs, C)
        ranked = [r for c in self.chunks(split.queries)
                  for r in rank_documents(self.embed(body, c) @ docs.T, k)]
        return ndcg_mrr(ranked, split.relevance, k)


FAMILIES = {"sc": SequenceClassification, "tc": TokenClassification, "qa": QuestionAnswering,
            "ir": Retrieval}
