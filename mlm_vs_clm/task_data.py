"""Fine-tuning records: JSON lines, the paper's hub datasets, the demo tasks. docs/finetuning.md."""

import hashlib
import json
import os
import random
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

from mlm_vs_clm import files
from mlm_vs_clm.docstrings import demo_task
from mlm_vs_clm.qa import EncodEvalQA, QuestionAnswering
from mlm_vs_clm.settings import optional
from mlm_vs_clm.tasks import Retrieval, SequenceClassification, TokenClassification, field

FAMILIES = {"sc": SequenceClassification, "tc": TokenClassification, "qa": QuestionAnswering,
            "ir": Retrieval}

def family_class(name: str, protocol: str):
    """The class of a family under a protocol: EncodEval's QA is a token classification."""
    return EncodEvalQA if name == "qa" and protocol == "encodeval" else FAMILIES[name]

def read_jsonl(path: str) -> list[tuple[str, dict]]:
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    return [(f"{path}, line {n}", record) for n, record in files.jsonl_records(path)]

class TaskData(NamedTuple):
    """A task's records, as (where, record) rows."""
    family: str
    train: list
    val: list | None  # None: hold out val_fraction of train (hold_out)
    test: list
    documents: dict  # ir: split name -> documents searched besides the judged ones ({}: none)
    labels: list | None = None  # tc: the dataset's tag names in id order (its ClassLabel)

# Hub records -> our records: pure functions, one record at a time
# The authors' labelled texts: a pair is one text, each part named (EncodEval's datasets.py)
GLUE_TEXTS = {"sst2": ("sentence",), "mnli": ("premise", "hypothesis"),
              "qqp": ("question1", "question2")}
GLUE_NAMES = {"mnli": ("Premise", "Hypothesis"), "qqp": ("Question 1", "Question 2")}

def glue_record(task: str, record: dict, input_format: str) -> dict:
    """mnli, qqp: text and text_pair, or one text "Premise: {p}\\nHypothesis: {h}" (paper)."""
    texts = [record[column] for column in GLUE_TEXTS[task]]
    if len(texts) == 1 or input_format != "paper":
        return dict(zip(("text", "text_pair"), texts)) | {"label": record["label"]}
    parts = (f"{name}: {text}" for name, text in zip(GLUE_NAMES[task], texts))
    return {"text": "\n".join(parts), "label": record["label"]}

def ner_record(record: dict, words: str, tags: str, tag_names: list[str] | None) -> dict | None:
    """Words and tag names (None: an empty sentence); IOB1 tags stay: bio_entities reads them."""
    tag_ids = list(record[tags])
    if not record[words]:
        return None
    for i, t in enumerate(tag_ids):
        if not isinstance(t, str) and (tag_names is None or not 0 <= t < len(tag_names)):
            raise ValueError(f"field {tags!r} item {i} is {t!r}, which has no tag name "
                             f"(the dataset's names: {tag_names})")
    return {"words": list(record[words]),
            "tags": [t if isinstance(t, str) else tag_names[t] for t in tag_ids]}

def squad_record(record: dict) -> dict:
    answers = record["answers"]
    return {"id": record["id"], "question": record["question"], "context": record["context"],
            "answers": {"text": list(answers["text"]),
                        "answer_start": list(answers["answer_start"])}}

def as_list_of_dicts(value) -> list[dict]:
    """A hub Sequence of structs comes as a dict of lists; JSON files give a list of dicts."""
    if isinstance(value, dict):
        return [dict(zip(value, items)) for items in zip(*value.values())]
    return list(value)

def entity_mentions(passage: str, entity_spans) -> list[tuple[int, int]]:
    """ReCoRD's mentions as [start, end) spans: copies differ on whether `end` is inclusive."""
    spans = []
    for i, e in enumerate(as_list_of_dicts(entity_spans)):
        text, start, end = e["text"], e["start"], e["end"]
        if passage[start:end] == text:
            spans.append((start, end))
        elif passage[start:end + 1] == text:
            spans.append((start, end + 1))
        else:
            raise ValueError(f"field 'entity_spans' item {i}: {text!r} is not at characters "
                             f"{start}..{end} of the passage")
    return sorted(set(spans))

def record_answers(context: str, answers: list[str], mentions: list) -> dict:
    """Every occurrence of every gold answer: its mentions, or where its text occurs."""
    found = [(start, context[start:end]) for start, end in mentions
             if context[start:end] in answers]
    for answer in set(answers) - {text for _, text in found}:
        at = context.find(answer)
        if at < 0:
            raise ValueError(f"field 'answers': {answer!r} is nowhere in the passage")
        while at >= 0:
            found.append((at, answer))
            at = context.find(answer, at + 1)
    found.sort()
    return {"text": [text for _, text in found], "answer_start": [start for start, _ in found]}

def record_record(record: dict, index: int) -> dict:
    """ReCoRD in SQuAD's shape (the authors' copy) or SuperGLUE's; every mention is a candidate."""
    context = record["context"] if "context" in record else record["passage"]
    question = record["question"] if "question" in record else record["query"]
    mentions = entity_mentions(context, record.get("entity_spans") or [])
    answers = record["answers"]
    if isinstance(answers, dict):  # SQuAD's shape
        answers = {"text": list(answers["text"]), "answer_start": list(answers["answer_start"])}
    else:
        answers = record_answers(context, list(answers), mentions)
    idx = record.get("idx")  # SuperGLUE's: {"passage": int, "query": int}
    qid = f"{idx['passage']}-{idx['query']}" if isinstance(idx, dict) else record.get("id", index)
    out = {"id": str(qid), "question": question, "context": context, "answers": answers}
    return out | {"candidates": [list(span) for span in mentions]} if mentions else out

# Retrieval: training pairs, and evaluation splits built from judgments (qrels)

class Judgment(NamedTuple):
    query: str  # query id
    document: str  # document id
    grade: int  # >= 1: relevant

def pair_rows(records, where: str) -> list:
    """MS MARCO training pairs {query, positive} -> relevant rows, a repeated pair kept once."""
    pairs = {}
    for i, r in enumerate(records):
        pairs.setdefault((r["query"], r["positive"]), f"{where}, record {i + 1}")
    return [(at, {"query": q, "document": d}) for (q, d), at in pairs.items()]

def judged_rows(judgments: list[Judgment], queries: dict, documents: dict, where: str) -> list:
    """A row of texts per judgment (grade 0 too: judged); a pair of texts keeps its top grade."""
    rows = {}
    for i, j in enumerate(judgments):
        for kind, texts, key in (("query", queries, j.query), ("document", documents, j.document)):
            if key not in texts:
                raise ValueError(f"{where}, judgment {i + 1}: {kind} id {key!r} has no text")
        pair = (queries[j.query], documents[j.document])
        if pair not in rows or j.grade > rows[pair][1]["grade"]:
            rows[pair] = (f"{where}, judgment {i + 1}",
                          {"query": pair[0], "document": pair[1], "grade": j.grade})
    return list(rows.values())

NQ_SPLIT_SEED = 0  # NQ's test queries, halved at random: seeded (the authors' split is not)

def halve_queries(judgments: list[Judgment], seed: int = NQ_SPLIT_SEED) -> dict:
    """{"validation": round(n / 2) random queries' judgments (as the authors), "test": the rest}."""
    ids = sorted({j.query for j in judgments})
    val = set(random.Random(seed).sample(ids, round(0.5 * len(ids))))
    return {"validation": [j for j in judgments if j.query in val],
            "test": [j for j in judgments if j.query not in val]}

def mldr_judgments(records) -> tuple[list[Judgment], dict]:
    """MLDR's records -> judgments and query texts; only positive passages, as the authors'."""
    judgments, queries = [], {}
    for r in records:
        queries[r["query_id"]] = r["query"]
        judgments += [Judgment(r["query_id"], p["docid"], 1)
                      for p in as_list_of_dicts(r["positive_passages"])]
    return judgments, queries

# Loading from the hub
# Loading-script datasets (`datasets` 4 won't run them): files read directly, or hub parquet
BEIR_FILES = {(f"BeIR/{name}", part): f"hf://datasets/BeIR/{name}/{part}.jsonl.gz"
              for name in ("msmarco", "nq") for part in ("queries", "corpus")}
PARQUET = {("hgissbkh/ontonotes5", None), ("hgissbkh/mldr-en", "default"),
           ("hgissbkh/mldr-en", "corpus")}

def hub(name: str, config: str | None, split: str):
    """One split of a hub dataset, through the optional `datasets` package."""
    datasets = optional("datasets", "loading the paper's datasets")
    try:
        if (name, config) in BEIR_FILES:
            return datasets.load_dataset("json", data_files=BEIR_FILES[name, config], split="train")
        revision = "refs/convert/parquet" if (name, config) in PARQUET else None
        return datasets.load_dataset(name, config, split=split, revision=revision)
    except Exception as e:  # no network, a renamed dataset: one line with the cure
        raise ValueError(f"{name}{' (' + config + ')' if config else ''}, split {split!r}, is "
                         f"needed from the Hugging Face hub and could not be loaded "
                         f"({str(e).splitlines()[0][:120]}): connect to the network once; the "
                         f"datasets cache serves it after that (HF_DATASETS_OFFLINE=1)") from None

def converted(name: str, split: str, records, convert: Callable) -> list:
    """(where, record) rows of convert(record, index) over a hub split, None results left out."""
    rows = []
    for i, r in enumerate(records):
        where = f"{name}/{split}, record {i + 1}"
        try:
            out = convert(r, i)
        except KeyError as e:
            raise ValueError(f"{where}: no field {e} (it has {sorted(r)}); has the hub dataset "
                             f"changed? Fix its converter in task_data.py") from None
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if out is not None:
            rows.append((where, out))
    return rows

def tag_names(ds, column: str, name: str) -> list[str] | None:
    """The names of a column of integer tags (ClassLabel, or TAG_NAMES); None for string tags."""
    feature = ds.features[column]
    inner = feature[0] if isinstance(feature, list) else getattr(feature, "feature", None)
    names = getattr(inner, "names", None) or TAG_NAMES.get(name)
    if names is None and getattr(inner, "dtype", "string") != "string":
        raise ValueError(f"{name}: column {column!r} holds integer tags without ClassLabel names; "
                         f"give the names in task_data.py")
    return names

def glue_task(task: str, test_split: str, input_format: str) -> TaskData:
    def rows(split):
        return converted(f"nyu-mll/glue {task}", split, hub("nyu-mll/glue", task, split),
                         lambda r, i: glue_record(task, r, input_format))
    return TaskData("sc", rows("train"), None, rows(test_split), {})

def ner_task(name: str, words: str, tags: str, input_format: str) -> TaskData:
    splits = {s: hub(name, None, s) for s in ("train", "validation", "test")}
    names = tag_names(splits["train"], tags, name)
    rows = {s: converted(name, s, ds, lambda r, i: ner_record(r, words, tags, names))
            for s, ds in splits.items()}
    return TaskData("tc", rows["train"], rows["validation"], rows["test"], {}, names)

def qa_task(name: str, convert: Callable, input_format: str) -> TaskData:
    train, test = (converted(name, s, hub(name, None, s), convert) for s in ("train", "validation"))
    return TaskData("qa", train, None, test, {})

def texts_by_id(ds, ids: set, id_column: str, text: Callable) -> dict:
    """id -> text for the rows of ds whose id is in ids (a corpus of millions: filter first)."""
    wanted = ds.filter(lambda batch: [str(i) in ids for i in batch], input_columns=id_column,
                       batched=True)
    return {str(r[id_column]): text(r) for r in wanted}

def judged_task(name: str, judgments: dict, queries: dict, id_column: str,
                document: Callable) -> TaskData:
    """An ir task trained on MS MARCO pairs; both splits search all judged documents (EncodEval)."""
    ids = {j.document for js in judgments.values() for j in js}
    documents = texts_by_id(hub(name, "corpus", "corpus"), ids, id_column, document)
    train = pair_rows(hub("hgissbkh/msmarco-pairs", None, "train"), "hgissbkh/msmarco-pairs/train")
    val, test = (judged_rows(judgments[s], queries, documents, f"{name}/{s}")
                 for s in ("validation", "test"))
    corpus = list(dict.fromkeys(r["document"] for _, r in val + test))
    return TaskData("ir", train, val, test, {"val": corpus, "test": corpus})

def beir_judgments(name: str, split: str) -> list[Judgment]:
    return [Judgment(str(r["query-id"]), str(r["corpus-id"]), int(r["score"]))
            for r in hub(name, None, split)]

def beir_task(name: str, judgments: dict, document: Callable) -> TaskData:
    """BEIR's queries and corpus (configs "queries" and "corpus", ids `_id`) for the judgments."""
    query_ids = {j.query for js in judgments.values() for j in js}
    queries = texts_by_id(hub(name, "queries", "queries"), query_ids, "_id", lambda r: r["text"])
    return judged_task(name, judgments, queries, "_id", document)

def msmarco_task(input_format) -> TaskData:
    # validation: MS MARCO dev (6,980 queries); test: TREC-DL 2019 (43 queries, graded 0-3)
    judgments = {s: beir_judgments("BeIR/msmarco-qrels", s) for s in ("validation", "test")}
    # BEIR's MS MARCO titles are empty; the authors use the text alone
    return beir_task("BeIR/msmarco", judgments, lambda r: r["text"])

def nq_task(input_format) -> TaskData:
    return beir_task("BeIR/nq", halve_queries(beir_judgments("BeIR/nq-qrels", "test")),
                     lambda r: f"{r['title']}. {r['text']}")  # the authors' "title. text"

def mldr_task(input_format) -> TaskData:
    name = "hgissbkh/mldr-en"
    judgments, queries = {}, {}
    for ours, theirs in (("validation", "dev"), ("test", "test")):
        judgments[ours], split_queries = mldr_judgments(hub(name, "default", theirs))
        queries |= split_queries
    return judged_task(name, judgments, queries, "docid", lambda r: r["text"])

class NamedTask(NamedTuple):
    family: str
    source: str  # where its splits come from, for messages and docs/finetuning.md
    load: Callable  # input_format -> TaskData
    one_epoch: bool = False  # encodeval: one epoch (CoNLL, UNER), else max_steps (EncodEval)

# OntoNotes' integer tags have no ClassLabel on the hub: tner/ontonotes5's label2id, in id order
TAG_NAMES = {"hgissbkh/ontonotes5": (
    "O B-CARDINAL B-DATE I-DATE B-PERSON I-PERSON B-NORP B-GPE I-GPE B-LAW I-LAW B-ORG I-ORG "
    "B-PERCENT I-PERCENT B-ORDINAL B-MONEY I-MONEY B-WORK_OF_ART I-WORK_OF_ART B-FAC B-TIME "
    "I-CARDINAL B-LOC B-QUANTITY I-QUANTITY I-NORP I-LOC B-PRODUCT I-TIME B-EVENT I-EVENT I-FAC "
    "B-LANGUAGE I-PRODUCT I-ORDINAL I-LANGUAGE").split()}

# --task name -> its hub sources and splits, as EncodEval loads them (HELD_OUT: by finetune.py)
HELD_OUT = "train (5% held out: validation) / test:"
HF_TASKS = {
    **{task: NamedTask("sc", f"nyu-mll/glue {task} {HELD_OUT} {test}",
                       partial(glue_task, task, test))
       for task, test in (("sst2", "validation"), ("qqp", "validation"),
                          ("mnli", "validation_matched"))},
    # The authors' copy (hgissbkh/conll2003-en: words, ner; IOB1 tags), not eriktks/conll2003
    # (IOB2, one sentence fewer per split): it is what EncodEval scores, on its own test split
    **{task: NamedTask("tc", f"{name} train / validation / test",
                       partial(ner_task, name, words, tags), one_epoch=task != "ontonotes")
       for task, name, words, tags in (("conll2003", "hgissbkh/conll2003-en", "words", "ner"),
                                       ("ontonotes", "hgissbkh/ontonotes5", "tokens", "tags"),
                                       ("uner", "hgissbkh/uner_en", "tokens", "ner_tags"))},
    **{task: NamedTask("qa", f"rajpurkar/{task} {HELD_OUT} validation",
                       partial(qa_task, f"rajpurkar/{task}", lambda r, i: squad_record(r)))
       for task in ("squad", "squad_v2")},
    "record": NamedTask("qa", f"hgissbkh/record {HELD_OUT} validation",
                        partial(qa_task, "hgissbkh/record", record_record)),
    "msmarco": NamedTask("ir", "train: hgissbkh/msmarco-pairs; BeIR/msmarco judged by BeIR/"
                               "msmarco-qrels validation (dev) / test (TREC-DL-19)", msmarco_task),
    "nq": NamedTask("ir", "train: hgissbkh/msmarco-pairs; BeIR/nq judged by BeIR/nq-qrels test, "
                          "its queries halved at random (seed 0): validation / test", nq_task),
    "mldr": NamedTask("ir", "train: hgissbkh/msmarco-pairs; hgissbkh/mldr-en dev / test",
                      mldr_task),
}

def load_task(cfg, data_dir: str = "") -> TaskData:
    """The task's records. data_dir: the checkpoint's pretraining data (the demo tasks' source)."""
    if cfg.task in FAMILIES:
        task = TaskData(cfg.task, read_jsonl(cfg.train), read_jsonl(cfg.val) if cfg.val else None,
                        read_jsonl(cfg.test), {})
    elif cfg.task in HF_TASKS:
        task = HF_TASKS[cfg.task].load(cfg.input_format)
    else:
        family = cfg.task.removeprefix("demo_")
        train, test = ([(f"{cfg.task} {split}, record {i + 1}", r) for i, r in enumerate(records)]
                       for split, records in zip(("train", "test"), demo_task(family, data_dir)))
        task = TaskData(family, train, None, test, {})
    for name, path, rows in (("training", cfg.train, task.train), ("validation", cfg.val, task.val),
                             ("test", cfg.test, task.test)):
        if rows is not None and not rows:
            raise ValueError(f"{path if cfg.task in FAMILIES else '--task=' + cfg.task}: "
                             f"the {name} split is empty")
    if not cfg.corpus:
        return task
    extra = task.documents.get("test", []) + [field(where, r, "text", str, "a non-empty string")
                                              for where, r in read_jsonl(cfg.corpus)]
    return task._replace(documents=task.documents | {"test": extra})

def hold_out(rows: list, family: str, fraction: float) -> tuple[list, list]:
    """(train, val): val is the lowest `fraction` by sha256 of each record (ir: of its query)."""
    def key(r):
        return r["query"] if family == "ir" else json.dumps(r, sort_keys=True)
    keys = sorted({key(r) for _, r in rows}, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
    if len(keys) < 2:
        raise ValueError(f"{rows[0][0]}: too few training examples to hold out a validation split")
    val = set(keys[:max(1, round(fraction * len(keys)))])
    return ([row for row in rows if key(row[1]) not in val],
            [row for row in rows if key(row[1]) in val])
