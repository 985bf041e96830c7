"""python -m bench.suffixreplay: suffix drafting (no draft model) replayed on recorded answers.

The target's greedy answer to a prompt is fixed, and under greedy verification a round commits
the longest path of the draft tree that the answer follows, plus one token. So the tokens per
round a suffix drafter gets are a function of its trees alone, and can be measured on recorded
answers without the models, the broker or a clock: deterministic, in a second, the same on
every machine. The answers are the real target's: bench/data/suffix_answers.json on code edits
built from HumanEval, bench/data/suffix_handwritten.json on edit requests written here in plain
words (nothing in specedge/edge/data/code_answers.json comes from either). Three drafters:
suffix matches only (the drafter before specedge/edge/copyalign.py), with the answer's
alignment to its prompt, and with the built-in suffix corpus too (specedge.edge.corpus, in the
target's tokenizer: the shipped one). Writes DIR/results.json and DIR/table.md."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from specedge.edge.suffix import SuffixIndex, accepted_len
from specedge.edge.suffixdraft import SuffixSource

DATA = Path(__file__).parent / "data" / "suffix_answers.json"
HANDWRITTEN = Path(__file__).parent / "data" / "suffix_handwritten.json"
DRAFTERS = ("suffix matches only", "suffix + alignment", "suffix + alignment + corpus")


def replay(prompt: list[int], answer: list[int], budget: int, align: bool = True,
           corpus: SuffixIndex | None = None) -> tuple[int, int]:
    """(rounds, tree nodes sent) for a model-free edge at a fixed tree budget (depth up to the
    budget, as an adaptive shape resized to it)."""
    src = SuffixSource(align=align, corpus=corpus)
    done = rounds = nodes = 0
    while done < len(answer):
        p = src.propose(prompt + answer[:done], budget, budget)
        done += accepted_len(p, answer[done:]) + 1
        rounds += 1
        nodes += p.size
    return rounds, nodes


def builtin_corpus() -> SuffixIndex | None:
    from specedge.edge import corpus
    from specedge.synthetic import load_tokenizer  # the target's tokenizer, shipped

    return corpus.load(corpus.BUILTIN, load_tokenizer())


def run(budgets: list[int], drafter: str, data: Path = DATA) -> list[dict]:
    answers = json.loads(data.read_text())["answers"]
    align = drafter != DRAFTERS[0]
    book = builtin_corpus() if drafter == DRAFTERS[2] else None
    rows = []
    for b in budgets:
        by: dict[str, list[int]] = {}
        for a in answers:
            r, n = replay(a["prompt"], a["answer"], b, align, book)
            acc = by.setdefault(a["category"], [0, 0, 0])
            acc[0] += len(a["answer"])
            acc[1] += r
            acc[2] += n
        tokens, rounds = sum(v[0] for v in by.values()), sum(v[1] for v in by.values())
        rows.append({"set": data.stem, "drafter": drafter, "budget": b, "align": align,
                     "corpus": book is not None, "tokens": tokens, "rounds": rounds,
                     "tokens_per_round": tokens / rounds,
                     "by_category": {c: v[0] / v[1] for c, v in sorted(by.items())}})
    return rows


def table(rows: list[dict]) -> str:
    out = []
    for name in dict.fromkeys(r["set"] for r in rows):
        mine = [r for r in rows if r["set"] == name]
        cats = list(mine[0]["by_category"])
        out += [f"{name}:", "", "| drafter | budget | tokens/round | " + " | ".join(cats) + " |",
                "|---|---|---|" + "---|" * len(cats)]
        for r in mine:
            out.append(f"| {r['drafter']} | {r['budget']} | {r['tokens_per_round']:.2f} | "
                       + " | ".join(f"{r['by_category'][c]:.2f}" for c in cats) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.suffixreplay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=int, nargs="+", default=[4, 7, 16])
    p.add_argument("--drafters", nargs="+", choices=DRAFTERS, default=list(DRAFTERS))
    p.add_argument("--out", type=Path, default=Path("bench/results/suffix-replay"))
    a = p.parse_args(argv)
    rows = [r for data in (DATA, HANDWRITTEN) for d in a.drafters
            for r in run(a.budgets, d, data)]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(rows, indent=1))
    (a.out / "table.md").write_text(table(rows))
    print(table(rows), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
