"""Extractive QA (SQuAD, SQuAD v2, ReCoRD) and EncodEval's answer tagging; docs/finetuning.md."""

import json
import statistics
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlm_vs_clm.metrics import position_f1, squad_scores
from mlm_vs_clm.tasks import Family, Split, field, init_head, token_spans

def token_range(spans: list[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """The first and the last token whose characters overlap [start, end) of the text."""
    return (next(i for i, (_, e) in enumerate(spans) if e > start),
            max(i for i, (s, _) in enumerate(spans) if s < end))

def window_starts(n_tokens: int, room: int, stride: int) -> list[int]:
    """First token of each window of `room` tokens, consecutive windows sharing `stride`."""
    starts = [0]
    while starts[-1] + room < n_tokens:
        starts.append(starts[-1] + room - stride)
    return starts

class Candidate(NamedTuple):
    """An answer the record allows (a ReCoRD mention): first, last token; [start, end) in chars."""
    first: int
    last: int
    start: int
    end: int

class QAExample(NamedTuple):
    """What scoring a question needs; no candidates: any span of the context."""
    id: str
    context: str
    spans: list[tuple[int, int]]
    answers: list[str]
    candidates: tuple = ()

class QAWindow(NamedTuple):
    """One window: context tokens lo..hi, token i at position i + offset; target (start, end)."""
    ids: list[int]
    example: QAExample
    lo: int
    hi: int
    offset: int
    target: tuple[int, int]

class QuestionAnswering(Family):
    name = "qa"
    metric = "f1"
    head_type = "qa_start_end"

    def setup(self, train):
        self.check(train)
        # a null answer is predicted only when training has unanswerable questions (SQuAD v2)
        self.allow_null = any(not r["answers"]["text"] for _, r in train)
        self.trivial_rule = "always no answer" if self.allow_null else None
        self.max_question = self.max_len // 4
        room = self.max_len - self.max_question - 2  # the fewest context tokens a window holds
        self.stride = min(self.cfg.doc_stride, room // 2)
        if self.stride < self.cfg.doc_stride:
            print(f"note: doc_stride {self.cfg.doc_stride} -> {self.stride}: windows of "
                  f"{self.max_len} tokens hold as few as {room} context tokens, and must advance")

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
            if not all(isinstance(x, list) for x in (texts, starts)) or len(texts) != len(starts):
                raise ValueError(f"{where}: field 'answers' needs lists 'text' and 'answer_start' "
                                 f"of equal length")
            for i, (text, start) in enumerate(zip(texts, starts)):
                if not isinstance(text, str) or not text or not isinstance(start, int) or \
                        context[start:start + len(text)] != text or start < 0:
                    raise ValueError(f"{where}: field 'answers' item {i}: text {text!r} is not at "
                                     f"character answer_start={start!r} of the context")
            if "candidates" in r:
                self.check_candidates(where, r, len(context))

    @staticmethod
    def check_candidates(where: str, record: dict, n_chars: int):
        candidates = field(where, record, "candidates", list, "a non-empty list of [start, end) "
                           "spans of the context, or left out to allow any span")
        for i, span in enumerate(candidates):
            ints = (isinstance(span, (list, tuple)) and len(span) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in span))
            if not ints or not 0 <= span[0] < span[1] <= n_chars:
                raise ValueError(f"{where}: field 'candidates' item {i} is {json.dumps(span)[:80]},"
                                 f" not integers [start, end) with 0 <= start < end <= {n_chars}")

    def prompt(self, question: str) -> list[int]:
        """Before the context: "Question: {q}\nContext: " as one text (paper), or "q <eot>"."""
        if self.cfg.input_format == "paper":
            return self.tok.encode(f"Question: {question}\nContext: ")[:self.max_question]
        return self.tok.encode(question)[:self.max_question] + [self.tok.eot_id]

    def tokens(self, r: dict):
        """Prompt, context tokens, their spans, the first answer's (first, last) token or None."""
        context = self.tok.encode(r["context"])
        spans = token_spans(self.tok, context, r["context"])
        first = None
        if r["answers"]["text"]:  # train on the first answer (SQuAD's training files have one)
            a = r["answers"]["answer_start"][0]
            first = token_range(spans, a, a + len(r["answers"]["text"][0]))
        return self.prompt(r["question"]), context, spans, first

    def encode(self, rows):
        """Each example becomes windows "prompt, context piece, <eot>". The null answer is the final
        <eot>: as the last token it sees the whole input under causal attention too (BERT: 0)."""
        items, eot = [], self.tok.eot_id
        for _, r in rows:
            prompt, ctx, spans, first = self.tokens(r)
            room = self.max_len - len(prompt) - 1
            example = QAExample(r["id"], r["context"], spans, r["answers"]["text"],
                                tuple(Candidate(*token_range(spans, a, b), a, b)
                                      for a, b in r.get("candidates", ())))
            for lo in window_starts(len(ctx), room, self.stride):
                hi = min(lo + room, len(ctx))
                ids = prompt + ctx[lo:hi] + [eot]
                offset = len(prompt) - lo
                if first and lo <= first[0] and first[1] < hi:
                    target = (first[0] + offset, first[1] + offset)
                else:  # no answer in this window (or at all): the null position
                    target = (len(ids) - 1, len(ids) - 1)
                items.append(QAWindow(ids, example, lo, hi, offset, target))
        return Split(items)

    def head(self, n_embd):
        return init_head(nn.Linear(n_embd, 2))

    def logits(self, body, head, seqs):
        hidden, mask = self.forward(body, seqs)
        logits = head(hidden).float().masked_fill(~mask.unsqueeze(-1), float("-inf"))  # no padding
        return logits[..., 0], logits[..., 1]  # start, end: (B, T) each

    def loss(self, body, head, batch):
        start, end = self.logits(body, head, [item.ids for item in batch])
        targets = torch.tensor([item.target for item in batch], device=self.device)  # (B, 2)
        return (F.cross_entropy(start, targets[:, 0]) + F.cross_entropy(end, targets[:, 1])) / 2

    def best_span(self, item, s, e) -> tuple[float, str] | None:
        """(score, text) of the best answer in one window: among the candidates inside it when the
        example has some (ReCoRD's mentions, any length), else of at most max_answer_tokens."""
        example, lo, hi, offset = item.example, item.lo, item.hi, item.offset
        if example.candidates:
            inside = [c for c in example.candidates if lo <= c.first and c.last < hi]
            scored = [(float(s[c.first + offset] + e[c.last + offset]), c) for c in inside]
            if not scored:
                return None
            score, c = max(scored, key=lambda pair: pair[0])
            return score, example.context[c.start:c.end]
        n = hi - lo
        if n == 0:
            return None
        pos = slice(lo + offset, hi + offset)
        scores = s[pos, None] + e[None, pos]  # (n, n): the span from context token lo+i to lo+j
        # 0 <= j - i < max_answer_tokens
        allowed = torch.ones(n, n, dtype=torch.bool).triu().tril(self.cfg.max_answer_tokens - 1)
        scores = scores.masked_fill(~allowed, float("-inf"))
        i, j = divmod(int(scores.argmax()), n)
        spans = example.spans
        return float(scores[i, j]), example.context[spans[lo + i][0]:spans[lo + j][1]].strip()

    def predict(self, split, start_logits: list, end_logits: list) -> dict:
        """Answer text per example id: the best over its windows; "" when the null score (the
        lowest over the windows) beats it, SQuAD v2's rule, or no window holds an answer."""
        best, null = {}, {}
        for item, s, e in zip(split.items, start_logits, end_logits):
            qid, last = item.example.id, len(item.ids) - 1
            null[qid] = min(null.get(qid, float("inf")), float(s[last] + e[last]))
            found = self.best_span(item, s, e)
            if found and (qid not in best or found[0] > best[qid][0]):
                best[qid] = found
        return {qid: "" if qid not in best or (self.allow_null and null[qid] > best[qid][0])
                else best[qid][1] for qid in null}

    def evaluate(self, body, head, split):
        starts, ends = [], []
        for chunk in self.chunks(split.items):
            s, e = self.logits(body, head, [item.ids for item in chunk])
            starts += list(s.cpu())
            ends += list(e.cpu())
        return self.score(split, self.predict(split, starts, ends))

    def score(self, split, predictions: dict) -> dict:
        """SQuAD's F1 and exact match, best over the gold answers (ReCoRD's official metric too)."""
        gold = {item.example.id: item.example.answers for item in split.items}
        pairs = [squad_scores(predictions[qid], answers) for qid, answers in gold.items()]
        return {"f1": statistics.fmean(f for _, f in pairs),
                "exact": statistics.fmean(x for x, _ in pairs)}

    def trivial(self, split):
        return self.score(split, {item.example.id: "" for item in split.items})

class EncodEvalQA(QuestionAnswering):
    """The authors' QA (--protocol=encodeval): one window's tokens tagged 1 in the first answer."""
    head_type = "token_2"
    labels = ("outside", "answer")

    def encode(self, rows):
        items = []
        for _, r in rows:
            prompt, context, _, answer = self.tokens(r)
            context = context[:self.max_len - len(prompt) - 1]  # only the context is cut
            gold = set()
            if answer and answer[1] < len(context):
                gold = set(range(len(prompt) + answer[0], len(prompt) + answer[1] + 1))
            items.append(AnswerTokens(prompt + context + [self.tok.eot_id], gold))
        return Split(items)

    def loss(self, body, head, batch):
        hidden, mask = self.forward(body, [item.ids for item in batch])
        labels = torch.zeros(mask.shape, dtype=torch.long)  # padding is ignored below
        for b, item in enumerate(batch):
            labels[b, list(item.gold)] = 1
        return F.cross_entropy(head(hidden[mask]).float(), labels.to(self.device)[mask])

    def evaluate(self, body, head, split):
        scores = []
        for chunk in self.chunks(split.items):
            hidden, mask = self.forward(body, [item.ids for item in chunk])
            inside = (head(hidden).argmax(-1) == 1) & mask  # (B, T)
            scores += [position_f1(set(inside[b].nonzero().flatten().tolist()), item.gold)
                       for b, item in enumerate(chunk)]
        return {"f1": statistics.fmean(scores)}

    def trivial(self, split):
        return {"f1": statistics.fmean(position_f1(set(), item.gold) for item in split.items)}

class AnswerTokens(NamedTuple):  # EncodEvalQA's item
    ids: list[int]
    gold: set  # the positions of the answer's tokens
