"""
The paper's datasets (task_data.py): each hub record shape converted to our records, the splits
each named task takes (the authors' EncodEval ones), and the retrieval evaluation sets built from
judgments. Nothing is downloaded: the hub is replaced by small records shaped like its own.
"""

from types import SimpleNamespace

import pytest

from mlm_vs_clm import task_data
from tests.helpers import make_family
from mlm_vs_clm.task_data import HF_TASKS, Judgment

CONLL_NAMES = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
UNER_NAMES = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
ONTONOTES_NAMES = ["O", "B-PERSON", "I-PERSON", "B-GPE", "I-GPE", "B-DATE", "I-DATE"]

def class_labels(names):
    """What datasets gives for a column of integer tags: Sequence(ClassLabel(names))."""
    return SimpleNamespace(feature=SimpleNamespace(names=names))

class FakeSplit:
    """The little of a datasets.Dataset that task_data uses: iteration, features, filter."""

    def __init__(self, records, features=None):
        self.records, self.features = records, features or {}

    def __iter__(self):
        return iter(self.records)

    def filter(self, function, input_columns, batched):
        keep = function([r[input_columns] for r in self.records])
        return FakeSplit([r for r, k in zip(self.records, keep) if k], self.features)

def squad(i, answered=True):
    context = f"Denver won game {i}."
    answers = {"text": ["Denver"], "answer_start": [0]} if answered else \
        {"text": [], "answer_start": []}
    return {"id": f"q{i}", "title": "Super_Bowl", "context": context, "question": "Who won?",
            "answers": answers}

def beir(prefix, n_queries, extra_docs=()):
    """BEIR's three parts: queries, corpus (more documents than are judged), judgments."""
    queries = [{"_id": f"{prefix}q{i}", "text": f"what is {prefix} {i}"} for i in range(n_queries)]
    corpus = [{"_id": f"{prefix}d{i}", "title": f"T{i}", "text": f"{prefix} {i} is a thing"}
              for i in range(n_queries + 5)] + list(extra_docs)
    return queries, corpus

MARCO_Q, MARCO_DOCS = beir("marco", 6)
NQ_Q, NQ_DOCS = beir("nq", 8)
FAKE_HUB = {
    ("nyu-mll/glue", "sst2", "train"): [{"sentence": f"a gem {i} .", "label": i % 2, "idx": i}
                                        for i in range(4)],
    ("nyu-mll/glue", "sst2", "validation"): [{"sentence": "dull .", "label": 0, "idx": 0}],
    ("nyu-mll/glue", "qqp", "train"): [{"question1": f"A{i}?", "question2": "B?", "label": i % 2,
                                        "idx": i} for i in range(4)],
    ("nyu-mll/glue", "qqp", "validation"): [{"question1": "C?", "question2": "D?", "label": 1,
                                             "idx": 0}],
    ("nyu-mll/glue", "mnli", "train"): [{"premise": f"P{i}", "hypothesis": "H", "label": i % 3,
                                         "idx": i} for i in range(6)],
    ("nyu-mll/glue", "mnli", "validation_matched"): [{"premise": "P", "hypothesis": "H",
                                                      "label": 2, "idx": 0}],
    ("rajpurkar/squad", None, "train"): [squad(i) for i in range(4)],
    ("rajpurkar/squad", None, "validation"): [squad(9)],
    ("rajpurkar/squad_v2", None, "train"): [squad(i, i % 2 == 0) for i in range(4)],
    ("rajpurkar/squad_v2", None, "validation"): [squad(9, False)],
    # the authors' ReCoRD copy: SQuAD's shape, several answers, no id
    ("hgissbkh/record", None, "train"): [
        {"question": "@placeholder won", "context": f"Obama, or Barack Obama {i}, won.",
         "answers": {"text": ["Obama", "Barack Obama"], "answer_start": [0, 10]}}
        for i in range(4)],
    ("hgissbkh/record", None, "validation"): [
        {"question": "@placeholder lost", "context": "Lyon lost.",
         "answers": {"text": ["Lyon"], "answer_start": [0]}}],
    ("hgissbkh/msmarco-pairs", None, "train"): [
        {"query": f"query {i}", "positive": f"passage {i}"} for i in range(5)]
        + [{"query": "query 0", "positive": "passage 0"}],  # a repeated pair
    ("BeIR/msmarco", "queries", "queries"): MARCO_Q,
    ("BeIR/msmarco", "corpus", "corpus"): MARCO_DOCS,
    ("BeIR/msmarco-qrels", None, "validation"): [
        {"query-id": "marcoq0", "corpus-id": "marcod0", "score": 1},
        {"query-id": "marcoq1", "corpus-id": "marcod1", "score": 1},
        {"query-id": "marcoq5", "corpus-id": "marcod5", "score": 0}],  # judged, none relevant
    ("BeIR/msmarco-qrels", None, "test"): [
        {"query-id": "marcoq2", "corpus-id": "marcod2", "score": 3},
        {"query-id": "marcoq2", "corpus-id": "marcod3", "score": 0},
        {"query-id": "marcoq3", "corpus-id": "marcod4", "score": 2}],
    ("BeIR/nq", "queries", "queries"): NQ_Q,
    ("BeIR/nq", "corpus", "corpus"): NQ_DOCS,
    ("BeIR/nq-qrels", None, "test"): [{"query-id": f"nqq{i}", "corpus-id": f"nqd{i}", "score": 1}
                                      for i in range(8)],
    ("hgissbkh/mldr-en", "default", "dev"): [
        {"query_id": "m0", "query": "long query 0",
         "positive_passages": [{"docid": "doc-0", "text": "", "title": ""}],
         "negative_passages": [{"docid": "doc-9", "text": "", "title": ""}]}],
    ("hgissbkh/mldr-en", "default", "test"): [
        {"query_id": "m1", "query": "long query 1",
         "positive_passages": [{"docid": "doc-1", "text": "", "title": ""},
                               {"docid": "doc-2", "text": "", "title": ""}],
         "negative_passages": []}],
    ("hgissbkh/mldr-en", "corpus", "corpus"): [{"docid": f"doc-{i}", "text": f"long doc {i}"}
                                               for i in range(10)],
}
NER = {  # name: (words column, tags column, names, record)
    "hgissbkh/conll2003-en": ("words", "ner", CONLL_NAMES,
                              {"words": ["EU", "rejects", "German", "call"], "ner": [4, 0, 8, 0]}),
    "hgissbkh/ontonotes5": ("tokens", "tags", ONTONOTES_NAMES,
                            {"tokens": ["Obama", "visited", "Paris"], "tags": [1, 0, 3]}),
    "hgissbkh/uner_en": ("tokens", "ner_tags", UNER_NAMES,
                         {"idx": "x", "text": "Bob runs", "tokens": ["Bob", "runs"],
                          "ner_tags": [1, 0], "annotator": ["a"]}),
}
for _name, (_words, _tags, _names, _record) in NER.items():
    for _split in ("train", "validation", "test"):
        # the first sentence of each split ends with the split's name, tagged O
        _marked = _record | {_words: _record[_words] + [_split], _tags: _record[_tags] + [0]}
        FAKE_HUB[_name, None, _split] = FakeSplit([_marked, _record],
                                                  {_tags: class_labels(_names)})

@pytest.fixture
def fake_hub(monkeypatch):
    """Replaces the hub by FAKE_HUB; returns the (name, config, split) asked for, in order."""
    asked = []

    def hub(name, config, split):
        asked.append((name, config, split))
        found = FAKE_HUB[name, config, split]
        return found if isinstance(found, FakeSplit) else FakeSplit(found)
    monkeypatch.setattr(task_data, "hub", hub)
    return asked

def sources(task):
    """The hub splits each of the task's splits was read from."""
    return {name: {where.rsplit(",", 1)[0] for where, _ in rows}
            for name, rows in (("train", task.train), ("val", task.val or []),
                               ("test", task.test))}

# --------------------------------------------------------------------------------------------------
# The splits of every named task

@pytest.mark.parametrize("name", list(HF_TASKS))
def test_every_named_task_loads_and_its_records_pass_the_checks(name, fake_hub):
    for input_format in ("paper", "eot"):
        task = HF_TASKS[name].load(input_format)
        assert task.family == HF_TASKS[name].family
        family, _ = make_family(task.family, [r for _, r in task.train],
                                input_format=input_format)
        family.check(task.test)
        family.check(task.val or [])
        for split in ("val", "test"):
            rows = getattr(task, split)
            if rows:  # encodes, with the documents the split searches
                family.encode(rows, task.documents[split]) if split in task.documents \
                    else family.encode(rows)

def test_sc_and_qa_validation_is_held_out_and_test_is_the_official_validation(fake_hub):
    for name, test in (("sst2", "validation"), ("qqp", "validation"),
                       ("mnli", "validation_matched")):
        task = HF_TASKS[name].load("paper")
        assert task.val is None  # finetune.py holds 5% of train out
        assert sources(task) == {"train": {f"nyu-mll/glue {name}/train"}, "val": set(),
                                 "test": {f"nyu-mll/glue {name}/{test}"}}
    for name, hub_name in (("squad", "rajpurkar/squad"), ("squad_v2", "rajpurkar/squad_v2"),
                           ("record", "hgissbkh/record")):
        task = HF_TASKS[name].load("paper")
        assert task.val is None and sources(task) == {
            "train": {f"{hub_name}/train"}, "val": set(), "test": {f"{hub_name}/validation"}}

def test_tc_uses_the_datasets_own_three_splits(fake_hub):
    for name, hub_name in (("conll2003", "hgissbkh/conll2003-en"),
                           ("ontonotes", "hgissbkh/ontonotes5"), ("uner", "hgissbkh/uner_en")):
        task = HF_TASKS[name].load("paper")
        assert sources(task) == {split: {f"{hub_name}/{theirs}"} for split, theirs in
                                 (("train", "train"), ("val", "validation"), ("test", "test"))}
        # the records really come from each split (the fake marks their first sentence)
        assert task.test[0][1]["words"][-1] == "test" and task.val[0][1]["words"][-1] == \
            "validation"
    conll = HF_TASKS["conll2003"].load("paper")
    # IOB1 as the authors' copy has it: I-ORG and I-MISC start entities, named by ClassLabel
    assert conll.train[1][1] == {"words": ["EU", "rejects", "German", "call"],
                                 "tags": ["I-ORG", "O", "I-MISC", "O"]}

def test_msmarco_trains_on_pairs_and_evaluates_on_beir_dev_and_trec_dl(fake_hub):
    task = HF_TASKS["msmarco"].load("paper")
    assert sources(task) == {"train": {"hgissbkh/msmarco-pairs/train"},
                             "val": {"BeIR/msmarco/validation"}, "test": {"BeIR/msmarco/test"}}
    assert [r for _, r in task.train] == [{"query": f"query {i}", "document": f"passage {i}"}
                                          for i in range(5)]  # the repeated pair once
    assert [r for _, r in task.test] == [
        {"query": "what is marco 2", "document": "marco 2 is a thing", "grade": 3},
        {"query": "what is marco 2", "document": "marco 3 is a thing", "grade": 0},
        {"query": "what is marco 3", "document": "marco 4 is a thing", "grade": 2}]
    # the corpus: every document judged in validation or test (score 0 too), not the whole corpus
    corpus = [f"marco {i} is a thing" for i in (0, 1, 5, 2, 3, 4)]
    assert task.documents == {"val": corpus, "test": corpus}
    assert ("BeIR/msmarco-qrels", None, "validation") in fake_hub

def test_nq_halves_its_test_queries_with_a_seed_and_uses_title_and_text(fake_hub):
    task = HF_TASKS["nq"].load("paper")
    val = {r["query"] for _, r in task.val}
    test = {r["query"] for _, r in task.test}
    assert len(val) == len(test) == 4 and not val & test  # 8 queries, 50/50, disjoint
    assert {r["query"] for _, r in HF_TASKS["nq"].load("paper").val} == val  # seeded
    assert "T3. nq 3 is a thing" in task.documents["test"]  # "title. text"
    assert len(task.documents["test"]) == 8  # only judged documents
    judgments = [Judgment(f"q{i}", f"d{i}", 1) for i in range(7)]
    halves = task_data.halve_queries(judgments)
    assert len({j.query for j in halves["validation"]}) == round(0.5 * 7)
    assert halves != task_data.halve_queries(judgments, seed=1)

def test_mldr_uses_dev_and_test_and_only_positive_passages(fake_hub):
    task = HF_TASKS["mldr"].load("paper")
    assert [r for _, r in task.val] == [{"query": "long query 0", "document": "long doc 0",
                                         "grade": 1}]
    assert len(task.test) == 2
    assert task.documents["test"] == ["long doc 0", "long doc 1", "long doc 2"]
    assert ("hgissbkh/mldr-en", "default", "dev") in fake_hub

def test_corpus_file_adds_distractors_to_the_test_split_of_a_named_task(fake_hub, tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "a distractor"}\n')
    cfg = SimpleNamespace(task="msmarco", input_format="paper", train="", val="", test="",
                          corpus=str(path))
    task = task_data.load_task(cfg)
    assert task.documents["test"][-1] == "a distractor"
    assert "a distractor" not in task.documents["val"]

# --------------------------------------------------------------------------------------------------
# Record conversions, one hub shape at a time

def test_glue_records_in_both_formats():
    mnli = {"premise": "P.", "hypothesis": "H.", "label": 2, "idx": 5}
    assert task_data.glue_record("mnli", mnli, "paper") == \
        {"text": "Premise: P.\nHypothesis: H.", "label": 2}
    assert task_data.glue_record("mnli", mnli, "eot") == \
        {"text": "P.", "text_pair": "H.", "label": 2}
    qqp = {"question1": "A?", "question2": "B?", "label": 0, "idx": 1}
    assert task_data.glue_record("qqp", qqp, "paper")["text"] == "Question 1: A?\nQuestion 2: B?"
    sst2 = {"sentence": "a gem .", "label": 1, "idx": 0}
    for input_format in ("paper", "eot"):
        assert task_data.glue_record("sst2", sst2, input_format) == \
            {"text": "a gem .", "label": 1}

def test_ner_records():
    record = {"words": ["EU", "rejects", "German"], "ner": [4, 0, 8]}
    assert task_data.ner_record(record, "words", "ner", CONLL_NAMES) == \
        {"words": ["EU", "rejects", "German"], "tags": ["I-ORG", "O", "I-MISC"]}
    strings = {"tokens": ["Bob"], "tags": ["B-PER"]}
    assert task_data.ner_record(strings, "tokens", "tags", None)["tags"] == ["B-PER"]
    assert task_data.ner_record({"tokens": [], "tags": []}, "tokens", "tags", None) is None
    with pytest.raises(ValueError, match="field 'ner' item 1 is 9"):
        task_data.ner_record({"words": ["a", "b"], "ner": [0, 9]}, "words", "ner", CONLL_NAMES)
    ds = FakeSplit([], {"ner": class_labels(CONLL_NAMES)})
    assert task_data.tag_names(ds, "ner", "x") == CONLL_NAMES
    unnamed = FakeSplit([], {"ner": SimpleNamespace(feature=SimpleNamespace(dtype="int32"))})
    with pytest.raises(ValueError, match="x: column 'ner' holds integer tags without"):
        task_data.tag_names(unnamed, "ner", "x")

def test_a_hub_record_without_a_field_is_named():
    records = [{"words": ["a"], "ner": [0]}, {"words": ["b"]}]
    with pytest.raises(ValueError) as e:
        task_data.converted("hgissbkh/conll2003-en", "train", records,
                            lambda r, i: task_data.ner_record(r, "words", "ner", CONLL_NAMES))
    assert str(e.value).startswith("hgissbkh/conll2003-en/train, record 2: no field 'ner'")
    with pytest.raises(ValueError, match=r"train, record 1: field 'ner' item 0 is 99"):
        task_data.converted("c", "train", [{"words": ["a"], "ner": [99]}],
                            lambda r, i: task_data.ner_record(r, "words", "ner", CONLL_NAMES))

SUPERGLUE_PASSAGE = "Obama met Merkel in Berlin. @highlight\nBarack Obama flew home"

def superglue_record(end_inclusive):
    mentions = [(0, 5), (10, 16), (20, 26), (39, 51)]  # Obama, Merkel, Berlin, Barack Obama
    spans = {"text": [SUPERGLUE_PASSAGE[a:b] for a, b in mentions],
             "start": [a for a, _ in mentions],
             "end": [b - end_inclusive for _, b in mentions]}  # a dict of lists, as datasets gives
    return {"passage": SUPERGLUE_PASSAGE, "query": "@placeholder spoke with the chancellor",
            "entities": ["Barack Obama", "Berlin", "Merkel", "Obama"], "entity_spans": spans,
            "answers": ["Obama", "Barack Obama"], "idx": {"passage": 3, "query": 7}}

@pytest.mark.parametrize("end_inclusive", [True, False])
def test_record_superglue_shape_gives_every_answer_occurrence_and_candidates(end_inclusive):
    out = task_data.record_record(superglue_record(end_inclusive), 0)
    assert out["id"] == "3-7" and out["question"].startswith("@placeholder")
    assert out["context"] == SUPERGLUE_PASSAGE
    # every mention of a gold answer, in passage order: "Obama" at 0, "Barack Obama" at 39
    assert out["answers"] == {"text": ["Obama", "Barack Obama"], "answer_start": [0, 39]}
    assert out["candidates"] == [[0, 5], [10, 16], [20, 26], [39, 51]]
    family, _ = make_family("qa", [out])  # passes the qa checks, candidates included
    assert family.encode([("r", out)]).items[0].example.candidates

def test_record_answers_outside_the_mentions_and_bad_spans():
    record = superglue_record(False) | {"answers": ["Obama", "home"]}
    out = task_data.record_record(record, 0)
    # "home" is no mention: its occurrence in the text is a gold answer all the same; "Obama"
    # inside the mention "Barack Obama" is not a mention of Obama
    assert out["answers"] == {"text": ["Obama", "home"],
                              "answer_start": [0, SUPERGLUE_PASSAGE.find("home")]}
    with pytest.raises(ValueError, match="'Paris' is nowhere in the passage"):
        task_data.record_record(superglue_record(False) | {"answers": ["Paris"]}, 0)
    broken = superglue_record(False)
    broken["entity_spans"] = {"text": ["Merkel"], "start": [0], "end": [6]}
    with pytest.raises(ValueError, match="field 'entity_spans' item 0: 'Merkel' is not at"):
        task_data.record_record(broken, 0)

def test_record_squad_shape_as_the_authors_copy():
    record = FAKE_HUB["hgissbkh/record", None, "train"][0]
    out = task_data.record_record(record, 12)
    assert out == {"id": "12", "question": "@placeholder won", "context": record["context"],
                   "answers": {"text": ["Obama", "Barack Obama"], "answer_start": [0, 10]}}

def test_retrieval_judgments_to_rows():
    queries, documents = {"q1": "what", "q2": "what"}, {"d1": "one", "d2": "two", "d3": "one"}
    judgments = [Judgment("q1", "d1", 0), Judgment("q1", "d2", 1), Judgment("q2", "d3", 2)]
    rows = task_data.judged_rows(judgments, queries, documents, "x/test")
    # same texts are the same query and document: the pair keeps its higher grade
    assert [r for _, r in rows] == [{"query": "what", "document": "one", "grade": 2},
                                    {"query": "what", "document": "two", "grade": 1}]
    assert rows[0][0] == "x/test, judgment 3"
    with pytest.raises(ValueError, match="x/test, judgment 1: document id 'd9' has no text"):
        task_data.judged_rows([Judgment("q1", "d9", 1)], queries, documents, "x/test")
    positives = {"docid": ["a", "b"], "text": ["", ""]}  # a dict of lists, as datasets gives
    judgments, texts = task_data.mldr_judgments([{"query_id": "m", "query": "q",
                                                  "positive_passages": positives}])
    assert judgments == [Judgment("m", "a", 1), Judgment("m", "b", 1)] and texts == {"m": "q"}

def test_missing_datasets_package_names_the_pip_package(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError(name)
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ImportError, match="pip install datasets"):
        task_data.hub("nyu-mll/glue", "sst2", "train")
