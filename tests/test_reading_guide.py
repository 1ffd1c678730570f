"""docs/reading-guide.md names code and tests; every name must resolve, so the guide cannot drift.

A code reference `path.py:name` (name possibly dotted, Class.method): that very file defines it, as a
def, a class, a method of one of its classes or an assignment at module level, so a reader who opens
the file finds it there (a name the file only imports does not count). Files are read with ast, never
imported. A test reference `tests/test_x.py::test_name`: the file exists and defines that test function.
A bare file reference (`minigpt/cpu/parallel.py`): the file exists.
"""
import ast
import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "reading-guide.md"
CODE_REF = re.compile(r"`([\w/]+\.py):([A-Za-z_][\w.]*)`")
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")
FILE_REF = re.compile(r"`((?:minigpt|tests)/[\w/]+\.py)`")


@functools.lru_cache(maxsize=None)
def defined_names(path):
    """Dotted names a file defines at module level (functions, classes, assignments) and in its classes."""
    names = set()
    for node in ast.parse((ROOT / path).read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{item.name}" for item in node.body if isinstance(item, ast.FunctionDef)}
        elif isinstance(node, ast.Assign):
            names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
    return names


def problem_with_code(path, name):
    """Why `path:name` does not resolve, or None."""
    if not (ROOT / path).is_file():
        return f"{path}:{name}: no such file"
    return None if name in defined_names(path) else f"{path}:{name}: {path} defines no {name}"


def problem_with_test(path, name):
    """Why `path::name` is not a test, or None."""
    if not (ROOT / path).is_file():
        return f"{path}::{name}: no such file"
    if not name.startswith("test_") or name not in defined_names(path):
        return f"{path}::{name}: {path} defines no test function {name}"
    return None


def problems(text):
    """Every reference in `text` that does not resolve, one line each."""
    found = [problem_with_code(path, name) for path, name in CODE_REF.findall(text)]
    found += [problem_with_test(path, name) for path, name in TEST_REF.findall(text)]
    found += [f"{path}: no such file" for path in FILE_REF.findall(text) if not (ROOT / path).is_file()]
    return list(dict.fromkeys(problem for problem in found if problem))  # each once, in order


def table_rows(text):
    """The body rows of every Markdown table in `text` (the header and the |---| line left out)."""
    rows, table = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            table.append(line)
        else:
            rows += table[2:]
            table = []
    return rows


def test_every_reference_in_the_guide_resolves():
    text = GUIDE.read_text()
    found = problems(text)
    assert not found, "\n".join(found)
    assert len(CODE_REF.findall(text)) > 50 and len(TEST_REF.findall(text)) > 40  # the patterns do match


def test_every_table_row_names_code_and_the_test_that_proves_it():
    rows = table_rows(GUIDE.read_text())
    assert len(rows) > 20
    for row in rows:
        assert CODE_REF.search(row) and TEST_REF.search(row), f"a row without code or test: {row[:80]}"


def test_the_readme_links_the_guide_near_its_top():
    readme = (ROOT / "README.md").read_text().splitlines()
    assert any("(docs/reading-guide.md)" in line for line in readme[:15])


def test_a_wrong_name_is_caught():
    """Test the tester: each kind of broken reference is reported, and a right one of each kind is not."""
    good = ("`minigpt/data.py:collate` `minigpt/model.py:GPTModel.loss` `train.py:main` "
            "`minigpt/plain_ops.py:layer_norm` `tests/test_data.py::test_collate_reference_example` "
            "`minigpt/cpu/parallel.py` `minigpt/losses.py:IGNORE_INDEX`")
    assert problems(good) == []
    broken = {
        "`minigpt/data.py:colate`": "defines no colate",
        "`minigpt/model.py:GPTModel.los`": "defines no GPTModel.los",
        "`minigpt/dat.py:collate`": "no such file",
        "`train.py:mian`": "defines no mian",
        "`minigpt/plain_ops.py:layer_nrom`": "defines no layer_nrom",
        "`minigpt/data.py:IGNORE_INDEX`": "defines no IGNORE_INDEX",  # imported there, defined in losses.py
        "`tests/test_data.py::test_collate_reference_exmple`": "defines no test function",
        "`tests/test_loader.py::numbered_dataset`": "defines no test function",  # a helper, not a test
        "`tests/test_dat.py::test_collate_reference_example`": "no such file",
        "`minigpt/paralel.py`": "no such file",
    }
    for reference, message in broken.items():
        found = problems(reference)
        assert len(found) == 1 and message in found[0], (reference, found)
