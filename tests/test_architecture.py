"""How the source reads: short functions. (Imports going one way: `lint-imports`, in make test.)"""

import ast
from pathlib import Path

import normlab

LONGEST = 80  # lines of a function, its docstring not counted


def _length(node: ast.FunctionDef) -> int:
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return body[-1].end_lineno - body[0].lineno + 1 if body else 0


def test_no_function_runs_over_80_lines():
    src = Path(normlab.__file__).parent
    too_long = []
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _length(node) > LONGEST:
                too_long.append(f"{path.relative_to(src)}:{node.lineno} {node.name}")
    assert too_long == []
