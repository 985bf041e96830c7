"""The Spec-Bench workload: prompts per category, first turn, in file order.

The prompts ship with the project (`bench/data/spec_bench/`, Apache-2.0, see its SOURCE.md);
`SPECEDGE_SPEC_BENCH` points at another copy of question.jsonl."""

from __future__ import annotations

import json
import os
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "spec_bench"


def spec_bench_path() -> Path:
    env = os.environ.get("SPECEDGE_SPEC_BENCH")
    return Path(env).expanduser() if env else DATA / "question.jsonl"


def load(per_category: int | None = None, categories: list[str] | None = None) -> list[dict]:
    """[{question_id, category, prompt}] with at most per_category prompts of each category."""
    out: list[dict] = []
    seen: dict[str, int] = {}
    with open(spec_bench_path(), encoding="utf-8") as f:
        for line in f:
            q = json.loads(line)
            cat = q["category"]
            if categories and cat not in categories:
                continue
            if per_category is not None and seen.get(cat, 0) >= per_category:
                continue
            seen[cat] = seen.get(cat, 0) + 1
            out.append({"question_id": q["question_id"], "category": cat, "prompt": q["turns"][0]})
    return out
