"""The default corpus: stdlib, numpy, torch docstrings (10% held out); demo tasks. docs/data.md."""

import ast
import functools
import hashlib
import importlib.util
import itertools
import json
import os
import re
import sysconfig
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

from mlm_vs_clm.settings import die_with_parent

# test suites are code, not prose; the stdlib's site-packages is others' code (numpy, torch: below)
SKIP_DIRS = {"tests", "test", "testing", "idle_test", "site-packages", "__pycache__"}
MIN_DOCSTRING_CHARS = 64  # shorter ones are mostly "Return self." style fragments, not prose
HELDOUT_FILE = "heldout.jsonl"  # written beside the token files: the held-out docstrings

@dataclass(frozen=True)
class Document:
    source: str  # "stdlib", "numpy" or "torch"
    module: str  # dotted module name, e.g. "json.decoder"
    name: str  # qualified name in the module, e.g. "JSONDecoder.decode"; "" for the module's own
    text: str

def _python_files(source: str, base: str, root: str):
    """(source, module, path) for every .py file under root, in sorted walk order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)  # in place: prunes the walk
        for filename in sorted(f for f in filenames if f.endswith(".py")):
            path = os.path.join(dirpath, filename)
            module = os.path.relpath(path, base)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            yield source, module, path

def _file_docstrings(item: tuple[str, str, str]) -> list[Document]:
    source, module, path = item
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []  # e.g. lib2to3 test data written in Python 2
    named = [("", tree)]  # the module's own docstring, then every def's in source order

    def visit(node, prefix):  # also finds defs nested in if/try/with blocks
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                named.append((prefix + child.name, child))
                visit(child, prefix + child.name + ".")
            elif isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                visit(child, prefix)  # defs are statements: not walking expressions saves 2/3
    visit(tree, "")
    texts = [(name, ast.get_docstring(node, clean=True)) for name, node in named]
    return [Document(source, module, name, text) for name, text in texts
            if text and len(text) >= MIN_DOCSTRING_CHARS]

def docstring_documents() -> list[Document]:
    """English docstrings of the stdlib, numpy and torch, parsed with ast (nothing is imported)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = list(_python_files("stdlib", stdlib, stdlib))
    for package in ("numpy", "torch"):
        for root in importlib.util.find_spec(package).submodule_search_locations:
            files += _python_files(package, os.path.dirname(root), root)
    # ~3,000 files to parse: a process per core (one left by a killed parent would block forever)
    first = {}  # copied docstrings: keep the first, so no text is in two splits
    with ProcessPoolExecutor(os.cpu_count(), initializer=die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        for doc in itertools.chain.from_iterable(pool.map(_file_docstrings, files, chunksize=16)):
            first.setdefault(doc.text, doc)
    return list(first.values())

def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by key, identical across runs and machines (unlike hash())."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64

def split_of(doc: Document) -> str:
    """'train' (85%), 'val' (5%) or 'heldout' (10%: for the demo tasks, never pretrained on)."""
    u = stable_fraction(f"{doc.module}:{doc.name}")
    return "train" if u < 0.85 else "val" if u < 0.90 else "heldout"

@functools.lru_cache(maxsize=2)
def heldout_documents(data_dir: str = "") -> tuple[Document, ...]:
    """The held-out docstrings: data_dir/heldout.jsonl if prepare wrote one, else parsed (~20 s)."""
    path = os.path.join(data_dir, HELDOUT_FILE)
    if data_dir and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return tuple(Document(**json.loads(line)) for line in f)
    return tuple(d for d in docstring_documents() if split_of(d) == "heldout")

def pretraining_texts(heldout_path: str) -> list[tuple[str, str]]:
    """(split, text) of train and val docstrings; held-out ones go to heldout_path (parsed once)."""
    docs = [(split_of(d), d) for d in docstring_documents()]
    with open(heldout_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(asdict(d)) + "\n" for split, d in docs if split == "heldout")
    return [(split, d.text) for split, d in docs if split != "heldout"]

# The demo tasks of finetune.py, one per family, from the held-out docstrings

def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]

# reST markup that marks code: ``literal``, :role:`target` and the default role `target`
CODE_MARKUP = re.compile(r"``(?P<literal>[^`]+?)``|:(?P<role>[\w:]+):`(?P<target>[^`]+)`"
                         r"|(?<![\w`])`(?P<default>[^`]+)`(?![\w`])")
PYTHON_ROLES = {"func", "meth", "class", "attr", "mod", "obj", "data", "const", "exc"}

def markup_to_bio(paragraph: str) -> tuple[list[str], list[str]]:
    """A reST paragraph's words, code markup stripped, with BIO tags: LIT for ``literals``, REF for
    Python objects (:func:`x`, `x`); other roles (:math:, :ref:) become plain words."""
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
            add(shown, "REF" if m["default"] is not None or m["role"].split(":")[-1] in PYTHON_ROLES
                else None)
        pos = m.end()
    add(paragraph[pos:], None)
    return words, tags

def parameter_sections(text: str) -> list[tuple[int, int, list[tuple[str, int, int]]]]:
    """(start, end, params) of each numpydoc "Parameters" or Google "Args:" section, header
    included; a param is (name, start, end), text[start:end] its description's first sentence."""
    lines = text.split("\n")
    line_start = [0, *itertools.accumulate(len(line) + 1 for line in lines)]
    indent = lambda line: len(line) - len(line.lstrip())  # noqa: E731
    entry = re.compile(r"\s*(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)*)\s*(?:\([^)]*\))?\s*:(?P<rest>.*)")
    sections, i = [], 0
    while i < len(lines):
        numpy = (lines[i].strip() == "Parameters" and i + 1 < len(lines)
                 and re.fullmatch(r"\s*-{3,}", lines[i + 1]))
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
            # its description: the deeper-indented lines below (Google-style, also this line's rest)
            j = i + 1
            while j < len(lines) and (not lines[j].strip() or indent(lines[j]) > entry_indent):
                j += 1
            end = line_start[j] - 1
            after = line_start[i] + m.start("rest") if google else line_start[i + 1]
            first = re.compile(r"\S").search(text, after, end)
            # "x1, x2 : array_like" shares one description: no single answer
            if first and "," not in m[1]:
                sentence = re.match(r".+?(?:\.(?=\s)|$)", text[first.start():end], re.S)[0].rstrip()
                params.append((m[1], first.start(), first.start() + len(sentence)))
            i = j
        if params:
            sections.append((start, len(text[:line_start[i] - 1].rstrip()), params))
    return sections

def demo_records(family: str, docs) -> list[tuple[object, dict]]:
    """(document, record) pairs of the demo task of a family; see demo_task."""
    if family == "sc":
        return [(d, {"text": " ".join(paragraphs(d.text)[0].split()), "label": d.source})
                for d in docs]
    if family == "tc":
        tagged = [(d, markup_to_bio(p)) for d in docs for p in paragraphs(d.text)]
        return [(d, {"words": words, "tags": tags})
                for d, (words, tags) in tagged if set(tags) - {"O"}]
    if family == "ir":
        pairs = [(d, {"query": " ".join(ps[0].split()), "document": "\n\n".join(ps[1:])})
                 for d in docs if len(ps := paragraphs(d.text)) >= 2]
        # a summary shared by several docstrings ("Deprecated.") singles out no body: left out
        counts = Counter(r["query"] for _, r in pairs)
        return [(d, r) for d, r in pairs if counts[r["query"]] == 1]
    with_params, used = [], set()
    for d in docs:  # a section copied into several docstrings is used once: not in train and test
        sections = parameter_sections(d.text)
        if sections and (section := d.text[sections[0][0]:sections[0][1]]) not in used:
            used.add(section)
            with_params.append((d, sections[0]))
    out = []
    for n, (d, (start, end, params)) in enumerate(with_params):
        context, answers = d.text[start:end], {}
        for name, s, e in params:  # documented twice (overloads): the first description answers
            answers.setdefault(name, {"text": [d.text[s:e]], "answer_start": [s - start]})
        _, (_, _, next_params) = with_params[(n + 1) % len(with_params)]
        absent = [name for name, _, _ in next_params
                  if not re.search(rf"(?<!\w){re.escape(name)}(?!\w)", context)]
        if absent:  # also asked: a parameter of the next section that this one lacks (no answer)
            answers[absent[0]] = {"text": [], "answer_start": []}
        out += [(d, {"id": f"{d.module}:{d.name}:{name}", "question": f"What is {name}?",
                     "context": context, "answers": a}) for name, a in answers.items()]
    return out

def demo_task(family: str, data_dir: str = "") -> tuple[list[dict], list[dict]]:
    """(train, test) of a family's demo task (docs/finetuning.md): ~75/25 by a stable doc hash."""
    train, test = [], []
    for d, record in demo_records(family, heldout_documents(data_dir)):
        (test if stable_fraction(f"demo:{d.module}:{d.name}") < 0.25 else train).append(record)
    return train, test
