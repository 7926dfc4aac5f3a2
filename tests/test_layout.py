"""The shape of the project: imports run one way (no cycle, function-local imports included), the
package never imports a script, model.py and objectives.py import nothing of the project, only
bench.py imports train.py, and lines stay within 100 columns."""

import ast
import glob
import os

from tests.helpers import HERE

SCRIPTS = {"train", "finetune", "bench", "sample", "experiment"}

def project_modules() -> dict:
    """module name -> path, for every .py file of the project outside the tests."""
    paths = glob.glob(os.path.join(HERE, "*.py")) + glob.glob(os.path.join(HERE, "mlm_vs_clm",
                                                                             "*.py"))
    names = {}
    for path in paths:
        name = os.path.relpath(path, HERE)[:-3].replace(os.sep, ".").removesuffix(".__init__")
        if not os.path.basename(path).startswith("test_"):
            names[name] = path
    return names

def imports_of(path: str, modules: dict) -> set:
    """The project modules a file imports anywhere in it, inside functions too."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        found |= {t for t in targets if t in modules}
    return found

def test_imports_run_one_way():
    modules = project_modules()
    graph = {name: imports_of(path, modules) - {name} for name, path in modules.items()}
    assert set(graph) >= {"model", "objectives", "data", "train", "mlm_vs_clm.runs"}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n)))
                   for n in graph[start])
    assert [name for name in graph if reaches(name, name)] == []  # no cycle
    assert graph["model"] == set() and graph["objectives"] == set()
    assert [(n, sorted(graph[n] & SCRIPTS)) for n in graph if n.startswith("mlm_vs_clm")
            and graph[n] & SCRIPTS] == []
    assert [n for n in graph if "train" in graph[n]] == ["bench"]

def test_lines_fit_in_100_columns():
    paths = [p for d in ("", "mlm_vs_clm", "tests", "config")
             for p in glob.glob(os.path.join(HERE, d, "*.py"))]
    long = [f"{path}:{i}" for path in paths
            for i, line in enumerate(open(path, encoding="utf-8"), start=1)
            if len(line.rstrip("\n")) > 100]
    assert long == []
