"""Read a list of strings out of Python source without running it: a research script's question list.

The file is parsed with `ast`. Only string literals, lists/tuples, names bound earlier, `+`, `+=` and
`.append`/`.extend` statements are followed, with Python's semantics (a list is shared by every name bound to it).
Anything that may bind or change the list otherwise (a call it is passed to, a method, item assignment, a binding
inside `if`/`for`/`try`/`with`, `global`, `del`, `:=`, `import *`) is refused with its line, so the list read is
always the one importing the file gives (`if __name__ == "__main__":` blocks do not run on import). data.py turns
the refusal into a DataError naming the file.
"""

from __future__ import annotations

import ast

_SUPPORTED = "only string literals, lists/tuples, names bound earlier, +, += and .append/.extend statements are"


class PySourceError(ValueError):
    """The list cannot be known without running the file; the message starts with the line when there is one."""


class _Unsupported(Exception):
    """Something the `.py` reader will not evaluate; raised only if the requested variable depends on it."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(reason)
        self.line, self.reason = line, reason


class _List(list):
    """A list value (Python's reference semantics: every name bound to it sees in-place changes). ``spoilt`` is set
    when code the reader does not follow may have changed it in place; using the list then raises that refusal."""

    spoilt: _Unsupported | None = None


# A value the reader understands: a string, or a list/tuple of such values, each with the line it was written on.
_Value = tuple["str | _List | tuple[_Value, ...]", int]
_Bindings = dict[str, "_Value | _Unsupported"]  # a failure is kept, and raised only if the variable needs it

_DESCRIPTIONS: dict[type, str] = {
    ast.Call: "a call",
    ast.ListComp: "a comprehension",
    ast.SetComp: "a comprehension",
    ast.DictComp: "a comprehension",
    ast.GeneratorExp: "a generator expression",
    ast.JoinedStr: "an f-string",
    ast.Attribute: "attribute access",
    ast.Subscript: "a subscript",
    ast.Starred: "`*` unpacking",
    ast.BinOp: "an operator other than +",
    ast.Constant: "a constant that is not a string",
    ast.Dict: "a dict",
    ast.Set: "a set",
}


def _refuse(node: ast.AST, text: str, what: str | None = None) -> _Unsupported:
    what = what or _DESCRIPTIONS.get(type(node), f"an expression of kind {type(node).__name__}")
    snippet = " ".join((ast.get_source_segment(text, node) or "").split())
    snippet = snippet if len(snippet) <= 40 else snippet[:37] + "..."
    return _Unsupported(node.lineno, f"{what} (`{snippet}`) is not supported; {_SUPPORTED}")


def _evaluate(node: ast.expr, text: str, bindings: _Bindings) -> _Value:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value, node.lineno  # implicit concatenation "a" "b" is already one Constant
    if isinstance(node, ast.List):
        return _List(_evaluate(element, text, bindings) for element in node.elts), node.lineno
    if isinstance(node, ast.Tuple):
        return tuple(_evaluate(element, text, bindings) for element in node.elts), node.lineno
    if isinstance(node, ast.Name):
        bound = bindings.get(node.id)
        if bound is None:
            raise _Unsupported(
                node.lineno, f"the name {node.id!r} is not bound at module level before it is used; {_SUPPORTED}"
            )
        if isinstance(bound, _Unsupported):
            raise bound
        if isinstance(bound[0], _List) and bound[0].spoilt is not None:
            raise bound[0].spoilt
        return bound
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, _ = _evaluate(node.left, text, bindings)
        right, _ = _evaluate(node.right, text, bindings)
        if isinstance(left, str) != isinstance(right, str):
            raise _refuse(node, text, "`+` of a string and a list")
        if isinstance(left, tuple) != isinstance(right, tuple):
            raise _refuse(node, text, "`+` of a list and a tuple")  # a TypeError in Python
        total = left + right  # type: ignore[operator]  # same kinds, checked above
        return (_List(total) if isinstance(left, list) else total), node.lineno
    raise _refuse(node, text)


def _bindings_of(statement: ast.stmt, text: str, bindings: _Bindings) -> _Bindings:
    """The module-level names a statement binds. Failures are stored, not raised: `client = OpenAI()`
    elsewhere in the file must not stop us reading a question list that does not use it."""

    def attempt(value: ast.expr) -> _Value | _Unsupported:
        try:
            return _evaluate(value, text, bindings)
        except _Unsupported as e:
            return e

    if isinstance(statement, ast.Assign):
        value = attempt(statement.value)
        bound: _Bindings = {}
        for target in statement.targets:
            if isinstance(target, ast.Name):
                bound[target.id] = value
            else:  # unpacking (`a, b = ...`) binds names we do not follow; item/attribute stores bind none
                names = [n.id for n in ast.walk(target) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)]
                bound.update({name: _refuse(target, text, "unpacking assignment") for name in names})
        return bound
    if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name) and statement.value:
        return {statement.target.id: attempt(statement.value)}
    if isinstance(statement, ast.AugAssign) and isinstance(statement.target, ast.Name):
        return {statement.target.id: _augmented(statement, text, bindings)}
    if isinstance(statement, ast.ImportFrom) and any(a.name == "*" for a in statement.names):
        return {name: _refuse(statement, text, "`import *` (it may re-bind any name)") for name in bindings}
    if isinstance(statement, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name.split(".")[0]): _refuse(statement, text, "an import") for a in statement.names}
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        reason = f"a definition (`{statement.name}`) is not supported; {_SUPPORTED}"
        return {statement.name: _Unsupported(statement.lineno, reason)}
    return {}  # what is nested in if/for/with/try is not followed: _follow_effects refuses the names it binds


def _augmented(statement: ast.AugAssign, text: str, bindings: _Bindings) -> _Value | _Unsupported:
    """`name += value`: a list grows in place (every name bound to it sees that); a str or tuple is re-bound."""
    try:
        current, line = _evaluate(statement.target, text, bindings)
    except _Unsupported as e:
        return e
    try:
        if not isinstance(statement.op, ast.Add):
            raise _refuse(statement, text, "augmented assignment other than +=")
        value, _ = _evaluate(statement.value, text, bindings)
        if isinstance(current, _List) and not isinstance(value, str):
            current.extend(value)
            return current, line
        if isinstance(current, _List) or type(current) is not type(value):
            # list += "ab" adds the characters one by one; str += list and tuple += list raise in Python
            kinds = ["list" if isinstance(v, list) else type(v).__name__ for v in (current, value)]
            raise _refuse(statement, text, f"`+=` of a {kinds[0]} and a {kinds[1]}")
        return current + value, line  # type: ignore[operator]  # both str or both tuple
    except _Unsupported as e:
        _spoil(current, e)
        return e


def _spoil(value: object, why: _Unsupported) -> None:
    if isinstance(value, _List) and value.spoilt is None:
        value.spoilt = why


_BLOCKS: dict[type, str] = {
    ast.If: "an `if`", ast.For: "a `for`", ast.AsyncFor: "a `for`", ast.While: "a `while`", ast.With: "a `with`",
    ast.AsyncWith: "a `with`", ast.Try: "a `try`", ast.TryStar: "a `try`", ast.Match: "a `match`",
}
# Builtins that never change a list passed to them (unless the file re-binds the name); any other call might.
_HARMLESS_CALLS = frozenset({
    "print", "len", "enumerate", "zip", "sorted", "list", "tuple", "set", "frozenset", "str", "repr", "any", "all",
    "sum", "min", "max", "isinstance", "iter", "reversed", "map", "filter", "range", "type", "id", "hash", "bool",
})
_HARMLESS_METHODS = frozenset({"count", "index", "copy"})


def _follow_effects(statement: ast.stmt, text: str, bindings: _Bindings) -> None:
    """Apply what a statement does to lists in place, and refuse (lazily, by line) whatever the reader cannot follow:
    a list passed to a call or a method, item assignment, names bound by `:=`, `global`, `del` or inside a block."""
    followed = _follow_list_method(statement, text, bindings)
    block = _BLOCKS.get(type(statement))
    for node in ast.walk(statement):
        if node is followed:
            continue
        if isinstance(node, ast.Call):
            for name, what in _names_a_call_may_change(node, bindings):
                _spoil(_value_of(bindings, name), _refuse(node, text, what))
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, (ast.Store, ast.Del)):
            if isinstance(node.value, ast.Name):
                _spoil(_value_of(bindings, node.value.id), _refuse(node, text, "item assignment or deletion"))
        elif isinstance(node, ast.NamedExpr):
            _rebind(bindings, node.target.id, _refuse(node, text, "an assignment expression (`:=`)"))
        elif isinstance(node, ast.Global):
            for name in node.names:
                _rebind(bindings, name, _refuse(node, text, "a `global` statement (a function may re-bind it)"))
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Del):
            _rebind(bindings, node.id, _refuse(node, text, "`del`"))
        elif block:
            for name in _names_bound_by(node):
                why = (f"{name!r} is bound inside {block} block (line {statement.lineno}), which the reader does not "
                       f"run; {_SUPPORTED} followed")
                _rebind(bindings, name, _Unsupported(node.lineno, why))


def _names_bound_by(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
        return [node.id]
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [a.asname or a.name.split(".")[0] for a in node.names]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
        return [node.name]
    return []


def _follow_list_method(statement: ast.stmt, text: str, bindings: _Bindings) -> ast.Call | None:
    """`name.append(x)` / `name.extend(xs)` as a statement of its own, on a list the reader follows: done in place.
    Returns the call it followed (None: not such a statement, and _follow_effects treats it as any other call)."""
    call = statement.value if isinstance(statement, ast.Expr) else None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
            and isinstance(call.func.value, ast.Name) and call.func.attr in ("append", "extend")):
        return None
    target = _value_of(bindings, call.func.value.id)
    if not isinstance(target, _List) or len(call.args) != 1 or call.keywords or isinstance(call.args[0], ast.Starred):
        return None
    try:
        value, line = _evaluate(call.args[0], text, bindings)
    except _Unsupported as e:
        _spoil(target, e)
        return call
    if call.func.attr == "append":
        target.append((value, line))
    elif isinstance(value, str):  # Python would add the characters one by one
        _spoil(target, _refuse(call, text, "`.extend()` with a string"))
    else:
        target.extend(value)
    return call


def _names_a_call_may_change(call: ast.Call, bindings: _Bindings) -> list[tuple[str, str]]:
    """(name, why) for each name whose list this call could change in place: the object of a method call, and any
    name passed to it (directly or inside a list/tuple/set/dict display), unless it is a harmless builtin."""
    func = call.func
    if isinstance(func, ast.Attribute):
        method = [(func.value.id, f"a call to `.{func.attr}()`")] if isinstance(func.value, ast.Name) else []
        if func.attr in _HARMLESS_METHODS:
            method = []
    else:
        method = []
    if isinstance(func, ast.Name) and func.id in _HARMLESS_CALLS and func.id not in bindings:
        return method
    passed = [arg.value if isinstance(arg, ast.Starred) else arg for arg in call.args]
    passed += [keyword.value for keyword in call.keywords]
    names = [n.id for arg in passed for n in _names_in_displays(arg)]
    return method + [(name, "a call the list is passed to") for name in names]


def _names_in_displays(node: ast.expr) -> list[ast.Name]:
    if isinstance(node, ast.Name):
        return [node]
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return [n for element in node.elts for n in _names_in_displays(element)]
    if isinstance(node, ast.Dict):
        return [n for value in node.values for n in _names_in_displays(value)]
    return []


def _value_of(bindings: _Bindings, name: str) -> object:
    bound = bindings.get(name)
    return bound[0] if isinstance(bound, tuple) else None


def _rebind(bindings: _Bindings, name: str, why: _Unsupported) -> None:
    _spoil(_value_of(bindings, name), why)  # `x += ...` inside a block also changes the list in place
    bindings[name] = why


def _is_main_guard(statement: ast.stmt) -> bool:
    """`if __name__ == "__main__":` runs only when the file is run as a script, not when it is imported."""
    test = statement.test if isinstance(statement, ast.If) else None
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq) and len(test.comparators) == 1
            and isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value == "__main__")


def read_string_list(text: str, variable: str, *, filename: str = "<source>") -> list[tuple[str, int]]:
    """(string, line) for each item of the list bound to `variable` at module level, as importing the file would
    bind it; a PySourceError says where (line) and why, when that list cannot be known without running the file."""
    try:
        tree = ast.parse(text, filename=filename)
    except SyntaxError as e:
        raise PySourceError(f"line {e.lineno}: not valid Python ({e.msg})") from None
    bindings: _Bindings = {}
    for statement in tree.body:  # in order, so a name means its latest binding before the use
        if _is_main_guard(statement):  # the list we read is the one importing the file gives
            continue
        _follow_effects(statement, text, bindings)
        bindings.update(_bindings_of(statement, text, bindings))
    if variable not in bindings:
        names = ", ".join(sorted(bindings)) or "none"
        raise PySourceError(f"no module-level variable {variable!r}; module-level names are: {names}")
    bound = bindings[variable]
    if isinstance(_value_of(bindings, variable), _List) and bound[0].spoilt is not None:
        bound = bound[0].spoilt
    if isinstance(bound, _Unsupported):
        raise PySourceError(f"line {bound.line}: variable {variable!r}: {bound.reason}")
    value, line = bound
    if isinstance(value, str):
        raise PySourceError(f"line {line}: variable {variable!r}: expected a list of strings, got a string")
    for index, (element, element_line) in enumerate(value):
        if not isinstance(element, str):
            where = f"line {element_line}: variable {variable!r}: item {index}"
            raise PySourceError(f"{where}: expected a string, got a list")
    return list(value)
