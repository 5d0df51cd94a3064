"""Shape suffixes in the engine's tensor modules: one letter, one meaning per module, with the legend in its docstring.

Each tensor module's docstring ends with a legend ("Shape letters:", then one line per letter: the letter, two or
more spaces, what it means). A name like ``logits_BV`` or ``mask_B11QS`` may use only letters its module's legend
declares, and a legend declares each letter once: a letter cannot quietly mean two things in one module (as K once
meant both top-p candidates and placeholders in sampling.py). The digit 1 is a size-one dimension everywhere.
Read from the source (ast), no import: the check needs no model and no torch.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[2] / "ao_resampling" / "engine"
TENSOR_MODULES = ["decoding/sampler", "decoding/nucleus", "decoding/decode_step", "decoding/attention",
                  "decoding/norms", "decoding/streams", "hooks", "reference", "loading/end_gate"]
SHAPE_SUFFIX = re.compile(r"^_?[a-z][a-z0-9]*(?:_[a-z0-9]+)*_([A-Z0-9]*[A-Z][A-Z0-9]*)$")
LEGEND_LINE = re.compile(r"^\s+([A-Z0-9])\s{2,}\S")


def legend(docstring: str) -> list[str]:
    """The letters a module docstring's "Shape letters:" block declares, in order (repeats kept)."""
    if "Shape letters:" not in docstring:
        return []
    block = docstring.split("Shape letters:", 1)[1]
    return [m.group(1) for line in block.splitlines() if (m := LEGEND_LINE.match(line))]


def suffixed_names(tree: ast.AST) -> set[str]:
    """Every variable, parameter, attribute and keyword name with a shape suffix."""
    names: set[str] = set()
    for node in ast.walk(tree):
        name = (node.id if isinstance(node, ast.Name) else node.arg if isinstance(node, (ast.arg, ast.keyword))
                else node.attr if isinstance(node, ast.Attribute) else None)
        if name and SHAPE_SUFFIX.match(name):
            names.add(name)
    return names


def test_legend_reads_letters_and_keeps_repeats():
    doc = "What it is.\n\nShape letters:\n    B  rows\n    K  candidates\n    K  placeholders\n    1  one\n"
    assert legend(doc) == ["B", "K", "K", "1"]
    assert legend("No legend here.\n    B  rows\n") == []


def test_suffixed_names_finds_names_parameters_attributes_and_keywords():
    tree = ast.parse("def f(x_BV, n):\n    self.mask_AS = g(y_B11QS=n_Q)\n    TOP_P = lora_ab = 1\n")
    assert suffixed_names(tree) == {"x_BV", "mask_AS", "y_B11QS", "n_Q"}


@pytest.mark.parametrize("module", TENSOR_MODULES)
def test_every_shape_letter_is_in_the_module_legend_once(module):
    tree = ast.parse((ENGINE / f"{module}.py").read_text())
    letters = legend(ast.get_docstring(tree) or "")
    assert letters, f"engine/{module}.py: no 'Shape letters:' legend in the module docstring"
    repeated = sorted({letter for letter in letters if letters.count(letter) > 1})
    assert not repeated, f"engine/{module}.py: the legend gives {repeated} more than one meaning"
    undeclared = {name: sorted(set(SHAPE_SUFFIX.match(name).group(1)) - set(letters) - {"1"})
                  for name in suffixed_names(tree)}
    assert not {n: u for n, u in undeclared.items() if u}, f"engine/{module}.py: letters not in its legend"
