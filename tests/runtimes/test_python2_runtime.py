"""The python2 runtime stays in the Python 2/3 common subset and the stdlib.

It runs under python3 in the other tests; here it is parsed with lib2to3's
Python 2 grammar (print statement and all). That grammar is lenient (it takes
f-strings, annotations, async...), so an AST check adds the py3-only
constructs it lets through.
"""

from __future__ import annotations

import ast
import sys
import warnings

import pytest

from .conftest import RUNTIMES_DIR

SERVER = RUNTIMES_DIR / "python2" / "server.py"


def parse_as_python2(source: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        from lib2to3 import pygram, pytree
        from lib2to3.pgen2 import driver

        grammar = pygram.python_grammar  # Python 2: print is a statement
        driver.Driver(grammar, convert=pytree.convert).parse_string(source)


def py3_only_constructs(source: str) -> list[str]:
    """Python-3-only syntax that lib2to3's Python 2 grammar accepts."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", "?")
        if isinstance(node, ast.JoinedStr):
            found.append(f"{line}: f-string")
        elif isinstance(node, ast.AsyncFunctionDef | ast.Await | ast.AsyncFor | ast.AsyncWith):
            found.append(f"{line}: async")
        elif isinstance(node, ast.arg) and node.annotation is not None:
            found.append(f"{line}: annotation")
        elif isinstance(node, ast.FunctionDef) and node.returns is not None:
            found.append(f"{line}: return annotation")
        elif isinstance(node, ast.AnnAssign):
            found.append(f"{line}: variable annotation")
        elif isinstance(node, ast.arguments) and (node.kwonlyargs or node.posonlyargs):
            found.append(f"{line}: keyword-only or positional-only arguments")
        elif isinstance(node, ast.Raise) and node.cause is not None:
            found.append(f"{line}: raise ... from")
        elif isinstance(node, ast.Nonlocal | ast.YieldFrom | ast.NamedExpr):
            found.append(f"{line}: {type(node).__name__}")
        elif isinstance(node, ast.List | ast.Tuple | ast.Set) and any(
            isinstance(e, ast.Starred) for e in node.elts
        ):
            found.append(f"{line}: star unpacking")  # f(*args) is fine in Python 2
    return found


def check_python2_subset(source: str) -> None:
    parse_as_python2(source)
    found = py3_only_constructs(source)
    if found:
        raise SyntaxError("py3-only syntax: " + ", ".join(found))


def test_server_is_in_the_python2_subset() -> None:
    check_python2_subset(SERVER.read_text())


@pytest.mark.parametrize(
    "line",
    [
        'print("a", file=sys.stderr)',
        'x = f"{y}"',
        "def f(x: int) -> int:\n    return x",
        "raise ValueError() from None",
        "async def f():\n    pass",
        "def f(*, a):\n    pass",
        "def f():\n    nonlocal x",
        "def f():\n    yield from g()",
        "x = [*a]",
    ],
    ids=[
        "print-kwargs",
        "f-string",
        "annotations",
        "raise-from",
        "async",
        "kw-only",
        "nonlocal",
        "yield-from",
        "star-unpacking",
    ],
)
def test_python2_subset_check_rejects_py3_only_syntax(line: str) -> None:
    with pytest.raises(Exception, match=r"bad input|py3-only syntax"):
        check_python2_subset(SERVER.read_text() + "\n" + line + "\n")


def test_python2_grammar_itself_rejects_print_with_keywords() -> None:
    with pytest.raises(Exception, match="bad input"):
        parse_as_python2('import sys\nprint("a", file=sys.stderr)\n')


def test_server_imports_only_the_standard_library() -> None:
    tree = ast.parse(SERVER.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    python2_only = {"BaseHTTPServer", "SocketServer", "urllib2", "imp"}
    assert names - python2_only <= sys.stdlib_module_names, names
