"""Task families sc, tc, ir (qa.py: qa): checks, encodings, heads, losses. docs/finetuning.md."""

import bisect
import itertools
import json
import re
import statistics
from collections import Counter
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlm_vs_clm.metrics import (accuracy, entity_f1, ndcg_mrr, rank_documents, sentence_macro_f1,
                                top_k_ndcg)

INPUT_FORMATS = ("paper", "eot")
HEAD_INIT_STD = 0.02  # EuroBERT's initializer_range: from_pretrained's start for a new head

# Tokens and the text they came from

def token_spans(tok, ids: list[int], text: str) -> list[tuple[int, int]]:
    """Each token's (start, end) in text; one that stops inside a multi-byte character: empty."""
    decoded, starts = tok.encoding.decode_with_offsets(ids)
    if decoded != text:
        raise ValueError(f"text does not survive encode/decode (invalid unicode?): {text[:60]!r}")
    return list(zip(starts, starts[1:] + [len(text)]))

def align_words(tok, words: list[str], max_len: int) -> tuple[list[int], list[int]]:
    """Words encoded one by one (with their leading space): ids, and where each kept word starts."""
    ids, starts = [], []
    for i, word in enumerate(words):
        piece = tok.encode(word if i == 0 else " " + word)
        if len(ids) + len(piece) > max_len:
            if i == 0:  # one word longer than max_len: keep its first tokens, to keep a label
                ids, starts = piece[:max_len], [0]
            break
        starts.append(len(ids))
        ids += piece
    return ids, starts

def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, C) -> (B, C), inputs padded on the right; mask (B, T) is True on real tokens."""
    if how == "mean":
        m = mask.unsqueeze(-1).type_as(hidden)  # (B, T, 1)
        return (hidden * m).sum(1) / m.sum(1)
    if how == "first":
        return hidden[:, 0]
    return hidden[torch.arange(hidden.size(0), device=hidden.device), mask.sum(1) - 1]

# The heads. Their parameter names are transformers' EuroBERT ones: they export as they are.

def init_head(head: nn.Module) -> nn.Module:
    for module in head.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=HEAD_INIT_STD)
            nn.init.zeros_(module.bias)
    return head

class SequenceClassifier(nn.Module):
    """transformers' EuroBertForSequenceClassification head (classifier_pooling "mean" or "bos")."""

    def __init__(self, n_embd: int, n_labels: int):
        super().__init__()
        self.dense = nn.Linear(n_embd, n_embd)
        self.activation = nn.GELU()
        self.classifier = nn.Linear(n_embd, n_labels)
        init_head(self)

    def forward(self, pooled):
        return self.classifier(self.activation(self.dense(pooled)))

class TokenClassifier(nn.Module):
    """transformers' EuroBertForTokenClassification head: one linear layer on each token."""

    def __init__(self, n_embd: int, n_tags: int):
        super().__init__()
        self.classifier = nn.Linear(n_embd, n_tags)
        init_head(self)

    def forward(self, hidden):
        return self.classifier(hidden)

# The families. Records are (where, dict) rows; `where` ("train.jsonl, line 12") starts each error

def field(where: str, record: dict, name: str, kinds, what: str):
    value = record.get(name)
    if (not isinstance(value, kinds) or isinstance(value, bool)
            or (isinstance(value, (str, list)) and not value)):
        found = "missing" if name not in record else f"got {json.dumps(value)[:80]}"
        raise ValueError(f"{where}: field {name!r} must be {what} ({found})")
    return value

class Labelled(NamedTuple):  # sc
    ids: list[int]
    label: int

class Tagged(NamedTuple):  # tc
    ids: list[int]
    starts: list[int]  # where each kept word's first sub-token is
    tags: list[int]  # each word's tag index

class QueryDocument(NamedTuple):  # ir: a relevant (query, document) pair, for training
    document: int  # index of the document in the split
    relevance: dict  # the query's judgments: document index -> grade
    query_ids: list[int]
    document_ids: list[int]

class Split(NamedTuple):
    items: list  # the examples above, in order
    # ir only: every query and document of the split, and each query's judgments
    queries: list | tuple = ()
    documents: list | tuple = ()
    relevance: list | tuple = ()

class Family:
    trivial_rule = None  # a constant prediction worth scoring next to the model's (sc and qa)
    one_epoch = False  # train for one epoch whatever max_steps (EncodEval's CoNLL and UNER)
    labels = ()  # the head's output names, saved with it (sc: the classes, tc: the tags)

    def __init__(self, cfg, tok, train: list, device, autocast, max_len: int,
                 labels: list | None = None):  # labels: the dataset's ClassLabel names, if any
        self.cfg, self.tok, self.device, self.autocast, self.max_len = \
            cfg, tok, device, autocast, max_len
        self.encodeval, self.given_labels = getattr(cfg, "protocol", "") == "encodeval", labels
        self.setup(train)

    def forward(self, body, seqs: list[list[int]]):
        """Right-padded batch through the body: hidden (B, T, C), mask (B, T) True on tokens."""
        lengths = torch.tensor([len(s) for s in seqs])
        idx = nn.utils.rnn.pad_sequence([torch.tensor(s, dtype=torch.long) for s in seqs],
                                        batch_first=True, padding_value=self.tok.pad_id)
        mask = (torch.arange(idx.size(1)) < lengths[:, None]).to(self.device)  # (B, T)
        with self.autocast():
            hidden = body(idx.to(self.device), causal=self.cfg.causal, attention_mask=mask)
        # the small heads run outside autocast, in the weights' dtype (--weights)
        return hidden.to(next(body.parameters()).dtype), mask

    def export(self) -> dict:  # what a saved model needs besides its weights (--save_model)
        return {"labels": list(self.labels), "head_type": self.head_type}

    def with_eot(self, texts: list[str]) -> list[list[int]]:
        """The paper format: tokens cut to leave room, then <eot> (the authors' lose it if long)."""
        return [ids[:self.max_len - 1] + [self.tok.eot_id] for ids in self.tok.encode_batch(texts)]

    def chunks(self, items: list):
        return (items[i:i + self.cfg.batch_size] for i in range(0, len(items), self.cfg.batch_size))

class SequenceClassification(Family):
    name = "sc"
    metric = "accuracy"
    trivial_rule = "the most frequent training label"

    def setup(self, train):
        self.pair, self.labels = "text_pair" in train[0][1], None  # the first record decides
        self.check(train)
        self.labels = sorted({r["label"] for _, r in train},
                             key=lambda label: (isinstance(label, str), label))
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.majority = Counter(r["label"] for _, r in train).most_common(1)[0][0]
        self.head_type = f"eurobert_sc_{self.cfg.pooling}"

    def check(self, rows):
        for where, r in rows:
            field(where, r, "text", str, "a non-empty string")
            if self.pair:
                field(where, r, "text_pair", str, "a non-empty string: this is a sentence-pair "
                      "task (the first training record has text_pair)")
            elif "text_pair" in r:
                raise ValueError(f"{where}: field 'text_pair' given, but this is a single-text "
                                 f"task (the first training record has no text_pair)")
            label = field(where, r, "label", (str, int), "a string or an integer")
            if self.labels is not None and label not in self.index:
                raise ValueError(f"{where}: field 'label' is {label!r}, not one of the training "
                                 f"labels {self.labels}")

    def encode(self, rows):
        if self.cfg.input_format == "paper":
            # a pair is one text on two lines, as the authors' labelled pairs ("Premise: ...")
            texts = [r["text"] + "\n" + r["text_pair"] if self.pair else r["text"] for _, r in rows]
            ids = self.with_eot(texts)
        else:
            ids = self.tok.encode_batch([r["text"] for _, r in rows])
            if self.pair:
                # no [SEP] in the vocabulary: the boundary pretraining knows, <eot>, marks b
                seconds = self.tok.encode_batch([r["text_pair"] for _, r in rows])
                ids = [a + [self.tok.eot_id] + b for a, b in zip(ids, seconds)]
        return Split([Labelled(s[:self.max_len], self.index[r["label"]])
                      for s, (_, r) in zip(ids, rows)])

    def head(self, n_embd):
        return SequenceClassifier(n_embd, len(self.labels))

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

    def trivial(self, split):
        return {"accuracy": accuracy([self.index[self.majority]] * len(split.items),
                                     [item.label for item in split.items])}

class TokenClassification(Family):
    name = "tc"
    metric = "f1"
    head_type = "linear_tc"

    def setup(self, train):
        self.tags = None
        self.check(train)
        # encodeval: the dataset's tag ids (its ClassLabel order), as the authors' heads
        self.tags = list(self.given_labels) if self.encodeval and self.given_labels else \
            ["O"] + sorted({t for _, r in train for t in r["tags"]} - {"O"})
        self.labels, self.index = self.tags, {t: i for i, t in enumerate(self.tags)}

    def check(self, rows):
        for where, r in rows:
            words = field(where, r, "words", list, "a non-empty list of words")
            tags = field(where, r, "tags", list, "a list of BIO tags, one per word")
            if len(tags) != len(words):
                raise ValueError(f"{where}: field 'tags': {len(tags)} tags for {len(words)} words")
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
        items, paper = [], self.cfg.input_format == "paper"
        for _, r in rows:
            if self.encodeval:  # EncodEval's: the words joined by spaces, then <eot>
                text = " ".join(r["words"])
                ids = self.tok.encode(text)
                word_end = list(itertools.accumulate(len(w) + 1 for w in r["words"]))
                # each token's word: its last character's (its first may be a space); <eot>: -1
                starts = [bisect.bisect_right(word_end, end - 1)
                          for _, end in token_spans(self.tok, ids, text)[:self.max_len - 1]] + [-1]
                ids = ids[:self.max_len - 1] + [self.tok.eot_id]
            else:  # paper: the words, then <eot> (a position without a label)
                ids, starts = align_words(self.tok, r["words"], self.max_len - paper)
                ids += [self.tok.eot_id] * paper
            items.append(Tagged(ids, starts, [self.index[t] for t in r["tags"]]))
        return Split(items)

    def head(self, n_embd):
        return TokenClassifier(n_embd, len(self.tags))

    def loss(self, body, head, batch):
        hidden, _ = self.forward(body, [item.ids for item in batch])
        if self.encodeval:  # every sub-token learns its word's tag
            picks = [(b, i, item.tags[w]) for b, item in enumerate(batch)
                     for i, w in enumerate(item.starts) if w >= 0]
        else:  # each kept word's first sub-token learns its tag
            picks = [(b, s, t) for b, item in enumerate(batch)
                     for s, t in zip(item.starts, item.tags)]
        logits = head(hidden[[p[0] for p in picks], [p[1] for p in picks]]).float()  # (N, n_tags)
        return F.cross_entropy(logits, torch.tensor([p[2] for p in picks], device=self.device))

    def evaluate(self, body, head, split):
        gold, predicted, scores = [], [], []
        for chunk in self.chunks(split.items):
            hidden, _ = self.forward(body, [item.ids for item in chunk])
            best = head(hidden).argmax(-1).tolist()  # (B, T)
            for b, item in enumerate(chunk):
                if self.encodeval:  # a word's tag: the majority of its sub-tokens', ties to the
                    votes = {}      # lowest id (the authors' max(set(p), key=p.count))
                    for w, p in zip(item.starts, best[b]):
                        votes.setdefault(w, []).append(p)
                    words = sorted(votes.keys() - {-1})  # the words truncation kept
                    majority = [max(sorted(set(votes[w])), key=votes[w].count) for w in words]
                    scores.append(sentence_macro_f1([item.tags[w] for w in words], majority))
                    continue
                gold.append([self.tags[t] for t in item.tags])
                # words cut off by max_len get "O": their entities count as missed, not dropped
                predicted.append([self.tags[best[b][s]] for s in item.starts]
                                 + ["O"] * (len(item.tags) - len(item.starts)))
        return {"f1": statistics.fmean(scores)} if self.encodeval else entity_f1(gold, predicted)

class Retrieval(Family):
    name = "ir"
    metric = "ndcg@10"
    head_type = "none"

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
        query_ids = self.tokens(list(queries), "Query: ")
        document_ids = self.tokens(list(documents), "Document: ")
        pairs = [QueryDocument(d, rel, query_ids[q], document_ids[d])
                 for q, rel in enumerate(relevance) for d, grade in rel.items() if grade > 0]
        return Split(pairs, query_ids, document_ids, relevance)

    def tokens(self, texts: list[str], label: str) -> list[list[int]]:
        """paper: "Query: {text}" or "Document: {text}", then <eot>; eot: the text alone."""
        if self.cfg.input_format == "paper":
            return self.with_eot([label + text for text in texts])
        return [s[:self.max_len] for s in self.tok.encode_batch(texts)]

    def head(self, n_embd):
        return nn.Identity()  # the paper's retriever is the pooled body alone

    def embed(self, body, seqs):
        hidden, mask = self.forward(body, seqs)
        return F.normalize(pool(hidden, mask, self.cfg.pooling).float(), dim=-1)  # (B, C)

    def loss(self, body, head, batch):
        q, d = self.embed(body, [item.query_ids for item in batch]
                          + [item.document_ids for item in batch]).chunk(2)  # (B, C) each: one pass
        scores = q @ d.T / self.cfg.temperature  # (B, B): positives on the diagonal
        # a document relevant to row i's query too is no negative (encodeval: the authors' keep it)
        not_negative = torch.tensor([[i != j and row.relevance.get(column.document, 0) > 0
                                      and not self.encodeval for j, column in enumerate(batch)]
                                     for i, row in enumerate(batch)], device=self.device)  # (B, B)
        scores = scores.masked_fill(not_negative, float("-inf"))
        return F.cross_entropy(scores, torch.arange(len(batch), device=self.device))

    def evaluate(self, body, head, split, k: int = 10):
        docs = torch.cat([self.embed(body, c) for c in self.chunks(split.documents)])  # (n_docs, C)
        ranked = [r for c in self.chunks(split.queries)
                  for r in rank_documents(self.embed(body, c) @ docs.T, k)]
        if self.encodeval:
            return {f"ndcg@{k}": top_k_ndcg(ranked, split.relevance, k)}
        return ndcg_mrr(ranked, split.relevance, k, self.cfg.empty_queries)

