"""Every module of leo_tf, benchmarks and tests opens with a one-line summary."""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
MODULES = sorted(
    path.relative_to(REPO)
    for folder in ("leo_tf", "benchmarks", "tests")
    for path in (REPO / folder).rglob("*.py")
)


@pytest.mark.parametrize("module", MODULES, ids=str)
def test_module_docstring_opens_with_a_whole_sentence_on_one_line(module):
    docstring = ast.get_docstring(ast.parse((REPO / module).read_text()))
    assert docstring, f"{module}: no module docstring"
    first, *rest = docstring.splitlines()
    assert first.rstrip().endswith("."), f"{module}: {first!r} is not one sentence"
    assert not rest or not rest[0].strip(), f"{module}: the summary runs on"
