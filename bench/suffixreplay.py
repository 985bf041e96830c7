"""python -m bench.suffixreplay: suffix drafting (no draft model) replayed on recorded answers.

The target's greedy answer to a prompt is fixed, and under greedy verification a round commits
the longest path of the draft tree that the answer follows, plus one token. So the tokens per
round a suffix drafter gets are a function of its trees alone, and can be measured on recorded
answers without the models, the broker or a clock: deterministic, in a second, the same on
every machine. The answers (bench/data/suffix_answers.json) are the real target's on code edits
built from HumanEval; `--no-align` drafts from suffix matches only (the drafter before
specedge/edge/copyalign.py), for comparison. Writes DIR/results.json and DIR/table.md."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from specedge.edge.suffix import accepted_len
from specedge.edge.suffixdraft import SuffixSource

DATA = Path(__file__).parent / "data" / "suffix_answers.json"


def replay(prompt: list[int], answer: list[int], budget: int, align: bool = True
           ) -> tuple[int, int]:
    """(rounds, tree nodes sent) for a model-free edge at a fixed tree budget (depth up to the
    budget, as an adaptive shape resized to it)."""
    src = SuffixSource(align=align)
    done = rounds = nodes = 0
    while done < len(answer):
        p = src.propose(prompt + answer[:done], budget, budget)
        done += accepted_len(p, answer[done:]) + 1
        rounds += 1
        nodes += p.size
    return rounds, nodes


def run(budgets: list[int], align: bool) -> list[dict]:
    answers = json.loads(DATA.read_text())["answers"]
    rows = []
    for b in budgets:
        by: dict[str, list[int]] = {}
        for a in answers:
            r, n = replay(a["prompt"], a["answer"], b, align)
            acc = by.setdefault(a["category"], [0, 0, 0])
            acc[0] += len(a["answer"])
            acc[1] += r
            acc[2] += n
        tokens, rounds = sum(v[0] for v in by.values()), sum(v[1] for v in by.values())
        rows.append({"budget": b, "align": align, "tokens": tokens, "rounds": rounds,
                     "tokens_per_round": tokens / rounds,
                     "by_category": {c: v[0] / v[1] for c, v in sorted(by.items())}})
    return rows


def table(rows: list[dict]) -> str:
    cats = list(rows[0]["by_category"])
    lines = ["| drafter | budget | tokens/round | " + " | ".join(cats) + " |",
             "|---|---|---|" + "---|" * len(cats)]
    for r in rows:
        name = "suffix + alignment" if r["align"] else "suffix matches only"
        lines.append(f"| {name} | {r['budget']} | {r['tokens_per_round']:.2f} | "
                     + " | ".join(f"{r['by_category'][c]:.2f}" for c in cats) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.suffixreplay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=int, nargs="+", default=[4, 7, 16])
    p.add_argument("--no-align", action="store_true", help="suffix matches only")
    p.add_argument("--out", type=Path, default=Path("bench/results/suffix-replay"))
    a = p.parse_args(argv)
    rows = run(a.budgets, False) + ([] if a.no_align else run(a.budgets, True))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(rows, indent=1))
    (a.out / "table.md").write_text(table(rows))
    print(table(rows), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
