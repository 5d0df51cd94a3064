"""data.py: loading and validating targets and question pools, the `.py` reader, and seeded sampling.

Error tests check that the message points at the right place (file, item index/id, field, line): that is what a
user with a hundred-item file needs. The real experiment files: tests/integration/test_experiment_data.py.
"""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ao_resampling.inputs.data import (
    DataError,
    Question,
    Target,
    load_question_pool,
    load_targets,
    question_id,
    sample_questions,
    select_targets,
)
from ao_resampling.inputs.py_source import read_string_list


def user(content: str = "hello") -> dict:
    return {"role": "user", "content": content}


def assistant(content: str = "hi there") -> dict:
    return {"role": "assistant", "content": content}


def system(content: str = "be brief") -> dict:
    return {"role": "system", "content": content}


def item(id: str = "t1", *messages: dict) -> dict:
    return {"id": id, "messages": list(messages) or [user()]}


def write(tmp_path: Path, name: str, content: object) -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def error_of(load, path: Path) -> str:
    with pytest.raises(DataError) as excinfo:
        load(path)
    return str(excinfo.value)


# ---------------------------------------------------------------------------------------------- built-in data


def test_builtin_data_is_package_data():
    folder = resources.files("ao_resampling") / "builtin_data"
    assert (folder / "targets.json").is_file() and (folder / "questions.json").is_file()


def test_builtin_targets_are_valid_and_varied():
    targets = load_targets()
    assert 10 <= len(targets) <= 16
    assert all(t.id.startswith("demo_") for t in targets)
    assert any(t.messages[0].role == "system" for t in targets)
    assert any(len(t.messages) >= 3 for t in targets), "at least one multi-turn conversation"


def test_builtin_question_pool_is_valid():
    pool = load_question_pool()
    assert len(pool) >= 12
    assert len(set(pool)) == len(pool)


# ---------------------------------------------------------------------------------------------- targets


def test_valid_conversation_shapes_load(tmp_path):
    data = [
        item("a"),
        item("b", system(), user()),
        item("c", user(), assistant(), user()),
        item("d", system(), user(), assistant()),  # ending on the assistant is fine
    ]
    targets = load_targets(write(tmp_path, "targets.json", data))
    assert [len(t.messages) for t in targets] == [1, 2, 3, 3]
    assert targets[1].messages[0].role == "system"


def test_the_example_message_from_the_issue(tmp_path):
    data = [item("q001"), item("q002"), item("q003"), item("q004", user(), {"role": "bot", "content": "x"})]
    path = write(tmp_path, "targets.json", data)
    assert error_of(load_targets, path) == (
        f"{path}: item 3 (id 'q004'): field 'messages[1].role': expected one of system/user/assistant, got 'bot'"
    )


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        pytest.param('[{"id": "a",\n  "messages": [}]', ["not valid JSON", "line 2, column"], id="not_json"),
        pytest.param({"id": "a", "messages": [user()]}, ["expected a JSON list"], id="not_a_list"),
        pytest.param([], ["at least one target"], id="empty_list"),
        pytest.param([item("a"), "b"], ["item 1:", "expected an object"], id="item_not_object"),
        pytest.param(
            [{**item("a"), "label": 1}], ["item 0 (id 'a')", "field 'label'", "unknown"],
            id="unknown_item_key",
        ),
        pytest.param([{"messages": [user()]}], ["item 0:", "field 'id'", "missing"], id="missing_id"),
        pytest.param([item(""), item("b")], ["item 0:", "field 'id'", "non-empty string"], id="empty_id"),
        pytest.param(
            [item("a"), {"id": 7, "messages": [user()]}], ["item 1:", "field 'id'", "got 7"],
            id="id_not_string",
        ),
        pytest.param(
            [item("a"), item("b"), item("a")], ["item 2 (id 'a')", "field 'id'", "unique", "item 0"],
            id="duplicate_id",
        ),
        pytest.param([{"id": "a"}], ["item 0 (id 'a')", "field 'messages'", "missing"], id="missing_messages"),
        pytest.param(
            [{"id": "a", "messages": []}], ["item 0 (id 'a')", "field 'messages'", "non-empty list"],
            id="empty_messages",
        ),
        pytest.param([{"id": "a", "messages": "hi"}], ["field 'messages'", "got 'hi'"], id="messages_not_list"),
        pytest.param(
            [item("a", "hello")], ["item 0 (id 'a')", "field 'messages[0]'", "expected an object"],
            id="message_not_object",
        ),
        pytest.param(
            [item("a", user(), {"role": "assistant", "contnet": "x"})],
            ["item 0 (id 'a')", "field 'messages[1].contnet'", "unknown"],
            id="unknown_message_key",
        ),
        pytest.param([item("a", {"content": "x"})], ["field 'messages[0].role'", "missing"], id="missing_role"),
        pytest.param(
            [item("a", {"role": "User", "content": "x"})], ["field 'messages[0].role'", "'User'"],
            id="role_wrong_case",
        ),
        pytest.param([item("a", {"role": "user"})], ["field 'messages[0].content'", "missing"], id="missing_content"),
        pytest.param([item("a", user(""))], ["field 'messages[0].content'", "non-empty string"], id="empty_content"),
        pytest.param(
            [item("a", user(" \n\t"))], ["field 'messages[0].content'", "non-empty string"],
            id="whitespace_content",
        ),
        pytest.param(
            [item("a", {"role": "user", "content": ["x"]})], ["field 'messages[0].content'"],
            id="content_not_string",
        ),
        pytest.param(
            [item("a", user(), system())], ["item 0 (id 'a')", "field 'messages[1].role'", "first"],
            id="system_not_first",
        ),
        pytest.param([item("a", system(), system(), user())], ["field 'messages[1].role'", "first"], id="two_systems"),
        pytest.param([item("a", system())], ["field 'messages'", "user message after the system"], id="system_only"),
        pytest.param(
            [item("a", assistant())], ["field 'messages[0].role'", "expected 'user'", "got 'assistant'"],
            id="starts_with_assistant",
        ),
        pytest.param(
            [item("a", system(), assistant())], ["field 'messages[1].role'", "expected 'user'"],
            id="system_then_assistant",
        ),
        pytest.param(
            [item("a", user(), user())], ["field 'messages[1].role'", "expected 'assistant'", "alternate"],
            id="two_user_turns",
        ),
        pytest.param(
            [item("a"), item("b", user(), assistant(), assistant())],
            ["item 1 (id 'b')", "field 'messages[2].role'", "expected 'user'"],
            id="two_assistant_turns",
        ),
    ],
)
def test_target_validation_names_the_place(tmp_path, content, fragments):
    path = write(tmp_path, "targets.json", content)
    message = error_of(load_targets, path)
    assert message.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    "name",
    [pytest.param("missing.json", id="missing_file"), pytest.param("", id="directory")],
)
def test_unreadable_targets_file_is_named(tmp_path, name):
    path = tmp_path / name
    message = error_of(load_targets, path)
    assert str(path) in message and "cannot read" in message


def test_targets_not_utf8(tmp_path):
    path = tmp_path / "targets.json"
    path.write_bytes(b'[{"id": "\xff"}]')
    assert "cannot read" in error_of(load_targets, path)


def test_select_targets_takes_the_first_n():
    targets = [Target(id=f"t{i}", messages=()) for i in range(5)]
    assert [t.id for t in select_targets(targets, 3)] == ["t0", "t1", "t2"]
    assert select_targets(targets, 5) == targets


@pytest.mark.parametrize(
    ("n", "fragments"),
    [
        pytest.param(6, ["targets.json", "asked for 6", "only 5 exist"], id="too_many"),
        pytest.param(0, ["targets.json", "at least 1", "got 0"], id="zero"),
        pytest.param(-2, ["at least 1"], id="negative"),
    ],
)
def test_select_targets_errors(n, fragments):
    targets = [Target(id=f"t{i}", messages=()) for i in range(5)]
    with pytest.raises(DataError) as excinfo:
        select_targets(targets, n, source="targets.json")
    for fragment in fragments:
        assert fragment in str(excinfo.value)


# ------------------------------------------------------------------------------------------ question pool: json, txt


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        pytest.param('["a",', ["not valid JSON", "line 1"], id="not_json"),
        pytest.param({"q": "a"}, ["expected a JSON list"], id="not_a_list"),
        pytest.param([], ["empty"], id="empty_pool"),
        pytest.param(["a", 3], ["item 1", "got 3"], id="item_not_string"),
        pytest.param(["a", "  "], ["item 1", "non-empty"], id="blank_item"),
        pytest.param(["a", "b", "c", "b"], ["item 3", "duplicate", "'b'", "item 1"], id="duplicate"),
        pytest.param(["a", "b ", "b"], ["item 2", "duplicate", "item 1"], id="duplicate_up_to_whitespace"),
    ],
)
def test_json_pool_validation_names_the_place(tmp_path, content, fragments):
    path = write(tmp_path, "questions.json", content)
    message = error_of(load_question_pool, path)
    assert message.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("name", [pytest.param("questions.txt", id="txt"), pytest.param("questions", id="no_suffix")])
def test_text_pool_one_question_per_line(tmp_path, name):
    path = write(tmp_path, name, "\n  What is the topic?  \n\n\tIs the assistant refusing?\n   \n")
    assert load_question_pool(path) == ["What is the topic?", "Is the assistant refusing?"]


@pytest.mark.parametrize("name, text", [
    pytest.param("questions.txt", "What is the topic?\nIs the assistant refusing?\n", id="txt"),
    pytest.param("questions.json", '["What is the topic?", "Is the assistant refusing?"]', id="json"),
    pytest.param("pool.py", 'sycophancy_questions = ["What is the topic?", "Is the assistant refusing?"]\n', id="py"),
])
def test_a_byte_order_mark_is_not_part_of_the_first_question(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # as Notepad saves "UTF-8 with BOM"
    assert load_question_pool(path) == ["What is the topic?", "Is the assistant refusing?"]


def test_text_pool_duplicate_names_both_lines(tmp_path):
    path = write(tmp_path, "questions.txt", "a\n\nb\na\n")
    message = error_of(load_question_pool, path)
    assert "line 4" in message and "line 1" in message and "duplicate" in message


def test_text_pool_empty(tmp_path):
    assert "empty" in error_of(load_question_pool, write(tmp_path, "questions.txt", "\n  \n"))


# ---------------------------------------------------------------------------------------------- question pool: .py


def read_py(tmp_path: Path, source: str, variable: str = "qs") -> list[str]:
    return load_question_pool(write(tmp_path, "questions.py", source), variable=variable)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        pytest.param('qs = ["a", "b"]', ["a", "b"], id="list"),
        pytest.param('qs = ("a", "b")', ["a", "b"], id="tuple"),
        pytest.param('qs = ["a" "b", "c"]', ["ab", "c"], id="implicit_string_concatenation"),
        pytest.param('x = "a"\nqs = [x + "!", "b"]', ["a!", "b"], id="string_plus"),
        pytest.param('first = "a"\nrest = ["b", "c"]\nqs = [first] + rest', ["a", "b", "c"], id="names_and_list_plus"),
        pytest.param('first: str = "a"\nqs: list[str] = [first]', ["a"], id="annotated_assignments"),
        pytest.param('x = ["a"]\nqs = x\nx = ["b"]', ["a"], id="latest_binding_before_use"),
        pytest.param('qs = ["a"]\nqs = ["b"]', ["b"], id="last_binding_of_variable_wins"),
        pytest.param('qs = ("a",) + ("b",)', ["a", "b"], id="tuple_plus"),
        pytest.param('a = b = ["x"]\nqs = b', ["x"], id="chained_assignment"),
        pytest.param(
            'import os\nclient = os.getenv("K")\ndef f(): pass\nqs = ["a"]',
            ["a"],
            id="unrelated_unsupported_code_is_ignored",
        ),
    ],
)
def test_python_reader_accepts(tmp_path, source, expected):
    assert read_py(tmp_path, source) == expected


@pytest.mark.parametrize(
    ("source", "fragments"),
    [
        pytest.param('x = 1\n\nqs = load("q.json")', ["line 3", "a call", "`load(\"q.json\")`"], id="call"),
        pytest.param('qs = [q for q in "ab"]', ["line 1", "a comprehension"], id="comprehension"),
        pytest.param('n = 1\nqs = [f"question {n}"]', ["line 2", "an f-string"], id="f_string"),
        pytest.param('qs = ["a", other]\nother = "b"', ["line 1", "'other'", "not bound"], id="name_bound_later"),
        pytest.param('qs = [missing]', ["line 1", "'missing'", "not bound"], id="unbound_name"),
        pytest.param('import data\nqs = data.QUESTIONS', ["line 2", "attribute access"], id="attribute"),
        pytest.param('x = ["a", "b"]\nqs = x[:1]', ["line 2", "a subscript"], id="subscript"),
        pytest.param('qs = ["a"] * 3', ["line 1", "other than +"], id="multiplication"),
        pytest.param('x = ["a"]\nqs = [*x, "b"]', ["line 2", "`*` unpacking"], id="starred"),
        pytest.param('qs = ["a", 3]', ["line 1", "not a string"], id="number"),
        pytest.param('qs = ["a"] + "b"', ["line 1", "a string and a list"], id="list_plus_string"),
        pytest.param('a, qs = "x", ["y"]', ["line 1", "unpacking"], id="tuple_unpacking"),
        pytest.param('from elsewhere import qs', ["line 1", "an import"], id="import"),
        pytest.param('x = load()\nqs = [x]', ["line 1", "a call"], id="depends_on_unsupported_name"),
        pytest.param('qs = "just one"', ["line 1", "expected a list of strings"], id="string_not_list"),
        pytest.param('qs = [["a"]]', ["line 1", "item 0", "expected a string"], id="nested_list"),
        pytest.param(
            'qs = [\n  "a",\n  "b",\n  "a",\n]', ["item 2 (line 4)", "duplicate", "item 0 (line 2)"],
            id="duplicate",
        ),
        pytest.param("qs = []", ["empty"], id="empty_list"),
        pytest.param('qs = ["a",\nx = 1', ["line 1", "not valid Python"], id="syntax_error"),
    ],
)
def test_python_reader_refuses_and_names_the_line(tmp_path, source, fragments):
    path = write(tmp_path, "questions.py", source)
    message = error_of(lambda p: load_question_pool(p, variable="qs"), path)
    assert message.startswith(f"{path}: ")
    if "empty" not in fragments and "not valid Python" not in fragments and "duplicate" not in fragments:
        assert "variable 'qs'" in message
    for fragment in fragments:
        assert fragment in message


def executed(source: str, variable: str = "qs") -> list[str]:
    """What importing the file gives (the test runs it; the tool never does)."""
    namespace: dict = {"__name__": "questions"}
    exec(compile(source, "questions.py", "exec"), namespace)  # noqa: S102 - test-only, on sources written here
    return list(namespace[variable])


@pytest.mark.parametrize("source", [
    pytest.param('qs = ["a"]\nqs.append("b")\nqs.extend(["c", "d"])', id="append_extend"),
    pytest.param('qs = ["a"]\nqs += ["b"]\nqs += ("c",)', id="augmented_list"),
    pytest.param('x = "a"\nx += "b"\nqs = (x,)\nqs += ("c",)', id="augmented_str_and_tuple"),
    pytest.param('qs = ["a"]\nalias = qs\nalias.append("b")\nalias += ["c"]', id="alias_changes_the_same_list"),
    pytest.param('a = ["a"]\nqs = a + []\na.append("b")', id="plus_makes_a_copy"),
    pytest.param('a = ["a"]\nqs = a\na = ["z"]\nqs.append("b")', id="rebinding_the_alias_leaves_the_list"),
    pytest.param('qs = ["a"]\nextra = ["b"]\nqs.extend(extra)\nextra.append("c")', id="extend_copies_items"),
    pytest.param('qs = ["a"]\nprint(qs, len(qs))\nassert len(qs) == 1\nn = qs.count("a")\nfor q in qs:\n'
                 '    print(q)\n', id="reading_the_list_changes_nothing"),
    pytest.param('qs = ["a"]\nif __name__ == "__main__":\n    qs.append("b")\n    qs = ["z"]\n', id="main_guard"),
    pytest.param('import random\nq = ["a"]\nqs = q + ["b"]\nrandom.shuffle(q)', id="shuffling_a_copy_source"),
])
def test_python_reader_follows_what_python_does(tmp_path, source):
    assert read_py(tmp_path, source) == executed(source)


@pytest.mark.parametrize(("source", "fragments"), [
    pytest.param('qs = ["a", "b"]\nqs[0] = "z"', ["line 2", "item assignment"], id="item_assignment"),
    pytest.param('qs = ["a", "b"]\ndel qs[0]', ["line 2", "item assignment or deletion"], id="item_deletion"),
    pytest.param('qs = ["a", "b"]\nalias = qs\nalias[0] = "z"', ["line 3", "item assignment"], id="through_alias"),
    pytest.param('qs = ["b", "a"]\nqs.sort()', ["line 2", "a call to `.sort()`"], id="sort"),
    pytest.param('qs = ["a"]\nqs.insert(0, "z")', ["line 2", "a call to `.insert()`"], id="insert"),
    pytest.param('qs = ["a"]\nx = qs.pop()', ["line 2", "a call to `.pop()`"], id="pop_in_an_expression"),
    pytest.param('import random\nqs = ["a", "b"]\nrandom.shuffle(qs)', ["line 3", "a call the list is passed to"],
                 id="passed_to_a_call"),
    pytest.param('qs = ["a"]\nqs.append(load())', ["line 2", "a call"], id="append_of_a_call"),
    pytest.param('qs = ["a"]\nqs.extend("bc")', ["line 2", "`.extend()` with a string"], id="extend_with_a_string"),
    pytest.param('qs = ["a"]\nqs += "bc"', ["line 2", "`+=` of a list and a str"], id="augmented_with_a_string"),
    pytest.param('qs = ["a"]\nif True:\n    qs = ["z"]', ["line 3", "inside an `if` block (line 2)"], id="if"),
    pytest.param('qs = ["a"]\nfor x in "bc":\n    qs.append(x)', ["line 3", "a call to `.append()`"], id="for"),
    pytest.param('qs = ["a"]\ntry:\n    qs += ["b"]\nexcept Exception:\n    pass',
                 ["line 3", "inside a `try` block (line 2)"], id="try"),
    pytest.param('qs = ["a"]\nwith open("f") as qs:\n    pass', ["line 2", "inside a `with` block"], id="with_as"),
    pytest.param('qs = ["a"]\ntry:\n    from other import qs\nexcept ImportError:\n    pass',
                 ["line 3", "inside a `try` block"], id="import_in_try"),
    pytest.param('qs = ["a"]\ndef f():\n    global qs\n    qs = []', ["line 3", "a `global` statement"], id="global"),
    pytest.param('qs = ["a"]\nprint(qs := ["z"])', ["line 2", "`:=`"], id="walrus"),
    pytest.param('qs = ["a"]\ndel qs', ["line 2", "`del`"], id="del"),
    pytest.param('qs = ["a"]\nfrom other import *', ["line 2", "`import *`"], id="star_import"),
    pytest.param('qs = ["a"] + ("b",)', ["line 1", "a list and a tuple"], id="list_plus_tuple"),
])
def test_python_reader_refuses_what_it_cannot_follow(tmp_path, source, fragments):
    path = write(tmp_path, "questions.py", source)
    message = error_of(lambda p: load_question_pool(p, variable="qs"), path)
    assert message.startswith(f"{path}: ") and "variable 'qs'" in message
    for fragment in fragments:
        assert fragment in message


RESEARCH_SCRIPT = """\
import os
os.environ["TORCHDYNAMO_DISABLE"] = "1"
import torch
model = load_model("m")
model.add_adapter(config, adapter_name="default")

def query(model, queries):
    model.disable_adapters()
    return [r.text for r in run(queries)]

conversation = [{"role": "user", "content": "hi"}]
for msg in conversation:
    print(f"  [{msg['role']}]: {msg['content']}")
with torch.no_grad():
    output_ids = model.generate(max_new_tokens=200)
initial_question = "Is there anything unusual?"
followup_questions = [
    "What evidence do you see?",
    "Why would it do that?",
]
qs = [initial_question] + followup_questions
assert len(qs) == 3, f"Expected 3 questions, got {len(qs)}"
queries = [make_query(question=q, layer=1) for q in qs]
responses = query(model, queries)
print(f"Q: {qs[0]}")
for i, (question, response) in enumerate(zip(qs[1:], responses[1:]), 1):
    print(question, response.lower())
"""


def test_a_research_script_around_the_list_is_read_like_python(tmp_path):
    # The shape of the experiment's sycophancy.py: model code before and after the list, none of which touches it.
    assert read_py(tmp_path, RESEARCH_SCRIPT) == ["Is there anything unusual?", "What evidence do you see?",
                                                  "Why would it do that?"]


@st.composite
def list_building_programs(draw) -> str:
    """Module-level list code of the kinds the reader follows, over three names bound to lists up front."""
    counter = iter(range(10_000))

    def literals() -> str:
        return "[" + ", ".join(f'"s{next(counter)}"' for _ in range(draw(st.integers(0, 2)))) + "]"

    names = st.sampled_from(["qs", "a", "b"])
    lines = [f"{name} = {literals()}" for name in ("qs", "a", "b")]
    for _ in range(draw(st.integers(0, 8))):
        n, m = draw(names), draw(names)
        lines.append(draw(st.sampled_from([
            f"{n} = {m}", f"{n} = {m} + {draw(names)}", f"{n} = {m} + {literals()}", f'{n}.append("s{next(counter)}")',
            f"{n}.extend({m})", f"{n}.extend({literals()})", f"{n} += {m}", f"{n} += {literals()}", f"print({n})",
            f'if __name__ == "__main__":\n    {n}.append("main")',
        ])))
    return "\n".join(lines) + "\n"


@settings(max_examples=150, deadline=None)
@given(list_building_programs())
def test_python_reader_equals_importing_the_file(source):
    # The entries before the pool's own checks: Python happily builds an empty list or one with repeats.
    assert [q for q, _ in read_string_list(source, "qs")] == executed(source), source


def test_python_reader_missing_variable_lists_bound_names(tmp_path):
    path = write(tmp_path, "questions.py", 'alpha = ["a"]\nbeta: str = "b"\nimport os\n')
    message = error_of(load_question_pool, path)
    assert "'sycophancy_questions'" in message
    assert "alpha, beta, os" in message


def test_python_reader_never_executes_the_file(tmp_path):
    marker = tmp_path / "ran.txt"
    source = f"open({str(marker)!r}, 'w').write('ran')\nraise SystemExit(1)\nqs = ['a', 'b']\n"
    assert read_py(tmp_path, source) == ["a", "b"]
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- sampling

POOL_16 = [f"q{i}" for i in range(16)]


def test_sampling_matches_a_fixed_selection():
    # Fixed from Random(0).sample(range(16), 5): if this changes, old runs' question ids stop reproducing.
    assert [q.id for q in sample_questions(POOL_16, 5, seed=0)] == ["aoq_00", "aoq_04", "aoq_06", "aoq_12", "aoq_15"]
    assert [q.text for q in sample_questions(POOL_16, 5, seed=0)] == ["q0", "q4", "q6", "q12", "q15"]


def test_sampling_is_deterministic():
    assert sample_questions(POOL_16, 6, seed=42) == sample_questions(POOL_16, 6, seed=42)


def test_different_seeds_usually_differ():
    selections = {tuple(q.id for q in sample_questions(POOL_16, 4, seed)) for seed in range(20)}
    assert len(selections) >= 15


def test_question_ids_are_stable_across_seeds_and_k():
    text_of: dict[str, str] = {}
    for seed in range(10):
        for k in (1, 4, 16):
            for question in sample_questions(POOL_16, k, seed):
                assert text_of.setdefault(question.id, question.text) == question.text
    assert text_of["aoq_07"] == "q7"


@pytest.mark.parametrize(
    ("size", "index", "expected"),
    [
        pytest.param(16, 3, "aoq_03", id="small_pool"),
        pytest.param(100, 99, "aoq_99", id="hundred_stays_two_digits"),
        pytest.param(101, 7, "aoq_007", id="over_hundred_widens"),
    ],
)
def test_question_id_width(size, index, expected):
    assert question_id(index, size) == expected


@pytest.mark.parametrize(
    ("k", "fragment"),
    [pytest.param(17, "only 16", id="more_than_pool"), pytest.param(0, "at least 1", id="zero")],
)
def test_sampling_errors(k, fragment):
    with pytest.raises(DataError, match=fragment):
        sample_questions(POOL_16, k, seed=0)


@given(data=st.data(), n=st.integers(1, 300), seed=st.integers(-(2**63), 2**63))
def test_sampling_properties(data, n, seed):
    pool = [f"question {i}" for i in range(n)]
    k = data.draw(st.integers(1, n), label="k")
    questions = sample_questions(pool, k, seed)
    positions = [pool.index(q.text) for q in questions]
    assert len(questions) == k
    assert positions == sorted(set(positions))
    assert all(isinstance(q, Question) and q.id == question_id(p, n) for q, p in zip(questions, positions))
    assert positions == sorted(random.Random(seed).sample(range(n), k))
