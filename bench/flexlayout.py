"""python bench/flexlayout.py --label L [--out DIR]: the flex query layout and the compile
ladder, measured with FlexAttention compiled on this CPU (inductor's C++ kernel).

Run as a file, so that the tree on PYTHONPATH is the one measured: the same script against
an older checkout gives the "before" of a change, in the same sitting (bench/README).

  - forward time of a model whose cost is attention (1 layer, 16 heads, long contexts) for
    the batch shapes the verifier sees: 32 sessions x 1 and x 9 rows over 512 and 2048
    cached tokens, 64 x 9 over 512, and a lone 512-token prefill chunk over 1536;
  - compiles: how many shapes were compiled, at start-up and while measuring, and seconds.

Writes DIR/flexlayout-L.json; prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# run as a file, its folder would come first on the path, where bench/kernels.py would pass
# for the `kernels` package transformers looks for
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]

import torch  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from specedge.execution import PackedRunner, Segment, flex  # noqa: E402
from specedge.execution.tree import depths_of  # noqa: E402

# (name, sessions, cached tokens, rows per session: 1 decode, 9 a root and an 8-node tree)
SHAPES = (("32x1@512", 32, 512, 1), ("32x1@2048", 32, 2048, 1), ("32x9@512", 32, 512, 9),
          ("64x9@512", 64, 512, 9), ("1x512@1536", 1, 1536, 512))
PARENTS = [0, 0, 1, 1, 2, 3, 4, 5]


def model() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=512, hidden_size=512, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=16, num_key_value_heads=4,
                      max_position_embeddings=4096)
    return Qwen2ForCausalLM(cfg).to(torch.float32).eval()


def compiles() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def segments(seqs, cached: int, rows: int) -> list[Segment]:
    for s in seqs:
        s.truncate(cached)
    if rows == 1:
        return [Segment.chain(s, [1]) for s in seqs]
    if len(seqs) == 1:
        return [Segment.chain(seqs[0], [1] * rows)]
    return [Segment.tree(s, [1], [2] * len(PARENTS), PARENTS, depths_of(PARENTS)) for s in seqs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", required=True)
    ap.add_argument("--out", default="bench/results/flexlayout")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    flex.COMPILE_ON = {"cpu", "cuda"}
    t0, c0 = time.perf_counter(), compiles()
    runner = PackedRunner(model(), attention="flex", kv_budget_tokens=64 * 2560)
    startup = {"compiles": compiles() - c0, "s": round(time.perf_counter() - t0, 1)}
    rows = []
    for name, n, cached, per in SHAPES:
        seqs = [runner.new_seq() for _ in range(n)]
        for s in seqs:  # the context, in pieces the ladder holds
            for a0 in range(0, cached, 512):
                runner.forward_flat([Segment.chain(s, [3] * min(512, cached - a0), logits_at=[])])
        c1 = compiles()
        runner.forward_flat(segments(seqs, cached, per))  # a first call may compile
        first = compiles() - c1
        times = []
        for _ in range(a.reps):
            segs = segments(seqs, cached, per)
            t = time.perf_counter()
            runner.forward_flat(segs)
            times.append(time.perf_counter() - t)
        rows.append({"shape": name, "ms": round(1000 * statistics.median(times), 2),
                     "compiles_on_first_call": first})
        for s in seqs:
            s.free()
        print(f"{a.label:>8} {name:>11} {rows[-1]['ms']:8.2f} ms  "
              f"compiles on first call: {first}", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"label": a.label, "startup": startup, "shapes": rows,
           "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out / f"flexlayout-{a.label}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(startup))


if __name__ == "__main__":
    main()
