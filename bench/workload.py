"""The Spec-Bench workload: prompts per category, first turn, in file order."""

from __future__ import annotations

import json
import os
from pathlib import Path


def spec_bench_path() -> Path:
    env = os.environ.get("SPECEDGE_SPEC_BENCH")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[1]
    return here.parent / "shared" / "data" / "spec_bench" / "question.jsonl"


def load(per_category: int | None = None, categories: list[str] | None = None) -> list[dict]:
    """[{question_id, category, prompt}] with at most per_category prompts of each category."""
    out, seen = [], {}
    with open(spec_bench_path()) as f:
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
