"""The package's layers, read from the source: no import circle, and imports only point down.

Every ``import`` counts, also one inside a function: an import moved into a function to dodge a circle is still
the circle. The layers (README, "Layout"):

    cli -> pipeline -> stages -> engine -> inputs -> foundation (config, errors, results, store)
                    -> analysis -------------------^

``analysis`` (results in, figures out) never imports a stage or the engine; the engine never imports a stage or
the pipeline; ``inputs`` are pure (no engine, no stage). Within ``stages``, no stage reaches sideways into another:
what more than one stage needs lives below them in ``stages/common/``, which imports no stage.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "ao_resampling"

# layer -> the layers it may import (itself included)
ALLOWED = {
    "foundation": {"foundation"},
    "inputs": {"foundation", "inputs"},
    "engine": {"foundation", "inputs", "engine"},
    "analysis": {"foundation", "inputs", "analysis"},
    "stages": {"foundation", "inputs", "engine", "stages"},
    "pipeline": {"foundation", "inputs", "engine", "stages", "analysis", "pipeline"},
    "cli": {"foundation", "inputs", "engine", "stages", "analysis", "pipeline", "cli"},
}
LAYER_FOLDERS = ("inputs", "engine", "stages", "analysis")
TOP_LEVEL = {"cli": "cli", "__main__": "cli", "pipeline": "pipeline", "sweep": "pipeline", "ranks": "pipeline"}
SHARED_STAGE_PIECES = "ao_resampling.stages.common"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """ao_resampling.engine.loading.models -> engine; top-level modules are the foundation unless named in TOP_LEVEL."""
    parts = module.split(".")[1:]
    if not parts:
        return "foundation"
    if parts[0] in LAYER_FOLDERS:
        return parts[0]
    return TOP_LEVEL.get(parts[0], "foundation")


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Package modules imported anywhere in the file (``from ao_resampling.x import y`` counts y if it is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ao_resampling"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ao_resampling"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known)
    return {m for m in found if m in known}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    # Importing a package runs its __init__, which may import nothing of ours: keep packages out of the edges.
    packages = {m for m, p in files.items() if p.name == "__init__.py"}
    return {m: imports_of(p, known) - packages - {m} for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle(graph):
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_imports_point_down(graph):
    upward = [f"{m} ({layer_of(m)}) imports {d} ({layer_of(d)})"
              for m, deps in sorted(graph.items()) for d in sorted(deps)
              if layer_of(d) not in ALLOWED[layer_of(m)]]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def is_shared_stage_piece(module: str) -> bool:
    return module == SHARED_STAGE_PIECES or module.startswith(SHARED_STAGE_PIECES + ".")


def sideways_stage_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports of one stage module by another that does not go through ``stages/common/`` (common importing a stage
    counts too: the shared pieces sit below every stage)."""
    return [f"{m} imports {d}" for m, deps in sorted(graph.items()) if layer_of(m) == "stages"
            for d in sorted(deps) if layer_of(d) == "stages" and not is_shared_stage_piece(d)]


def test_no_stage_imports_another(graph):
    sideways = sideways_stage_imports(graph)
    assert not sideways, "stages reaching sideways (move the shared piece to stages/common/):\n" + "\n".join(sideways)


def test_the_sideways_rule_sees_a_stage_importing_a_stage():
    stages = "ao_resampling.stages"
    assert sideways_stage_imports({f"{stages}.baseline": {f"{stages}.generate", f"{stages}.common.sampling"},
                                   f"{stages}.common.prompts": {f"{stages}.judge"},
                                   f"{stages}.judge": {f"{stages}.common.judge_prompt", "ao_resampling.store"}}) == [
        f"{stages}.baseline imports {stages}.generate", f"{stages}.common.prompts imports {stages}.judge"]


def test_layers_are_folders():
    for layer in LAYER_FOLDERS:
        assert (PACKAGE / layer / "__init__.py").exists(), f"ao_resampling/{layer}/ is a layer of the README's layout"


def test_the_walker_sees_function_level_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from ao_resampling.pipeline import x\n")
    assert imports_of(source, {"ao_resampling.pipeline"}) == {"ao_resampling.pipeline"}


# The engine's rooms: loading (where models come from) knows nothing of decoding; the engine as a whole writes and
# reads no run-folder file (results.json, the journal, its events: process orchestration sits with the pipeline).
RUN_FOLDER_MODULES = {"ao_resampling.store", "ao_resampling.results", "ao_resampling.events"}


def test_loading_does_not_reach_into_decoding(graph):
    crossing = [f"{m} imports {d}" for m, deps in sorted(graph.items()) for d in sorted(deps)
                if m.startswith("ao_resampling.engine.loading") and d.startswith("ao_resampling.engine.decoding")]
    assert not crossing, "\n".join(crossing)


def test_the_engine_touches_no_run_folder_file(graph):
    touching = [f"{m} imports {d}" for m, deps in sorted(graph.items()) for d in sorted(deps)
                if m.startswith("ao_resampling.engine") and d in RUN_FOLDER_MODULES]
    assert not touching, "\n".join(touching)


def test_the_engine_is_in_rooms():
    rooms = {p.name for p in (PACKAGE / "engine").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert {"loading", "decoding"} <= rooms
    assert (PACKAGE / "engine" / "decoding" / "sampler.py").exists()
    assert not (PACKAGE / "engine" / "distributed.py").exists(), "process orchestration sits with the pipeline"
