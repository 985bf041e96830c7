"""docs/system.svg, the picture of the system, from the declarations below: `python
docs/system.py` (or `make docs`) rewrites it; tests/test_docs.py fails when it is stale.

Subject names, bucket names, consumer names and message types come from the code
(specedge/subjects.py, schemas/wire.py), so renaming one changes the picture or breaks this
script, never leaves the picture wrong. Plain SVG text: deterministic, no plotting library."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from html import escape
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from schemas.wire import DraftBlock, Rejected, SessionClosed, SessionOpened, Verdict  # noqa: E402
from specedge import subjects  # noqa: E402

OUT = ROOT / "docs" / "system.svg"
SID = "<edge>.<nonce>"
STORED_DRAFT = subjects.partition_filter(0).replace(".0.*.*", ".<p>." + SID)


@dataclass(frozen=True)
class Box:
    x: int
    y: int
    w: int
    h: int
    title: str
    lines: tuple[str, ...] = ()
    fill: str = "#ffffff"
    mono: bool = False  # lines are subjects or names: monospace


@dataclass(frozen=True)
class Arrow:
    points: tuple[tuple[int, int], ...]
    step: int = 0  # the round's step number drawn at its middle (0: none)
    dashed: bool = False
    color: str = "#1f4e79"


EDGE_FILL, BROKER_FILL, STREAM_FILL, KV_FILL, VERIFIER_FILL = (
    "#e8f1fb", "#f4f4f4", "#fff6e0", "#eaf6ea", "#fbe9e7")

EDGES = tuple(
    Box(20, y, 220, 120, f"edge {name}",
        ("draft model (small)", "drafts a token tree per round",
         "python -m specedge.edge [serve]", "OpenAI API on :8000"), EDGE_FILL)
    for name, y in (("alice", 90), ("bob", 250), ("... (many)", 410)))

BROKER = Box(320, 50, 500, 560, "NATS JetStream (broker)", (), BROKER_FILL)
STREAM = Box(340, 90, 460, 230, f"stream {subjects.STREAM}: work queue and every session's log",
             (subjects.session(SID),
              f"    {SessionOpened.__name__}, {SessionClosed.__name__}",
              subjects.draft(SID),
              f"    {DraftBlock.__name__}, stored as",
              f"    {STORED_DRAFT}",
              subjects.verdict(SID),
              f"    {Verdict.__name__}, {Rejected.__name__}",
              f"consumers {subjects.partition_durable(0)} ... "
              f"{subjects.partition_durable(subjects.PARTITIONS - 1)}",
              "    durable pull, one per partition"), STREAM_FILL, mono=True)
KV = Box(340, 370, 460, 100, "key-value buckets",
         (f"{subjects.LEASES}: verifier members, partition leases",
          f"{subjects.FLEET}: each verifier's limits"), KV_FILL, mono=True)
FLEET = Box(340, 500, 460, 90, "core subjects (not stored)",
            (f"{subjects.fleet_query()}: edges ask for the limits",
             f"{subjects.fleet_limits()}: verifiers announce them"), KV_FILL, mono=True)

HALF = subjects.PARTITIONS // 2
VERIFIERS = tuple(
    Box(900, y, 200, 130, f"verifier {name}",
        ("target model (large)", f"partitions {lo}-{hi} (leases)",
         "one batched forward verifies", "many edges' trees"), VERIFIER_FILL)
    for name, y, lo, hi in (("v1", 110, 0, HALF - 1),
                            ("v2", 300, HALF, subjects.PARTITIONS - 1)))



def row(b: Box, i: int) -> int:
    """The y of the middle of a box's line i (where an arrow to that line ends)."""
    return b.y + 40 + 20 * i


# the stream's lines an arrow points at
Y_SESSION, Y_DRAFT, Y_VERDICT, Y_CONSUMERS = (row(STREAM, i) for i in (0, 2, 5, 7))

ALICE, BOB = EDGES[0], EDGES[1]
V1 = VERIFIERS[0]
ARROWS = (
    Arrow(((ALICE.x + ALICE.w, 110), (STREAM.x, Y_SESSION)), step=1),
    Arrow(((ALICE.x + ALICE.w, 140), (STREAM.x, Y_DRAFT)), step=2),
    Arrow(((BOB.x + BOB.w, 280), (STREAM.x, Y_DRAFT + 6)), color="#8aa4bf"),
    Arrow(((STREAM.x + STREAM.w, Y_CONSUMERS), (V1.x, 215)), step=3),
    Arrow(((V1.x, 160), (STREAM.x + STREAM.w, Y_VERDICT)), step=4),
    Arrow(((STREAM.x, Y_VERDICT), (ALICE.x + ALICE.w, 185)), step=5),
    Arrow(((VERIFIERS[1].x, 370), (KV.x + KV.w, 420)), dashed=True, color="#3c7a3c"),
    Arrow(((V1.x, 225), (KV.x + KV.w, 400)), dashed=True, color="#3c7a3c"),
    Arrow(((ALICE.x + ALICE.w, 195), (FLEET.x, 530)), dashed=True, color="#3c7a3c"),
)

LEGEND = (
    f"1  {SessionOpened.__name__}: prompt ids, sampling, seed, models; once per session "
    f"({SessionClosed.__name__} at its end)",
    f"2  {DraftBlock.__name__}: the draft tree rooted at the committed sequence C, with the "
    "round number and len(C)",
    "3  a verifier pulls a batch from the partitions it leases: blocks of many edges, one "
    "forward of the target",
    f"4  {Verdict.__name__}: the accepted path and the target's next token (published, then "
    "the block is acked)",
    "5  the edge hears its verdict on a core subscription (or reads it from the stream), "
    "appends the same tokens, drafts again",
    "dashed: verifiers heartbeat their partition leases and publish their limits; edges ask "
    "for the limits",
)

W, H = 1120, 690 + 20 * len(LEGEND)


def _text(x: int, y: int, s: str, size: int = 13, weight: str = "normal", mono: bool = False,
          anchor: str = "start", color: str = "#222222") -> str:
    family = "DejaVu Sans Mono, monospace" if mono else "DejaVu Sans, Arial, sans-serif"
    return (f'<text x="{x}" y="{y}" font-family="{family}" font-size="{size}" '
            f'font-weight="{weight}" text-anchor="{anchor}" fill="{color}">{escape(s)}</text>')


def _box(b: Box) -> list[str]:
    out = [f'<rect x="{b.x}" y="{b.y}" width="{b.w}" height="{b.h}" rx="8" fill="{b.fill}" '
           'stroke="#555555" stroke-width="1.2"/>',
           _text(b.x + 10, b.y + 20, b.title, 14, "bold")]
    for i, line in enumerate(b.lines):  # leading spaces indent (SVG would collapse them)
        indent = 8 * (len(line) - len(line.lstrip()))
        out.append(_text(b.x + 10 + indent, row(b, i) + 4, line.strip(), 12, mono=b.mono))
    return out


def _arrow(a: Arrow) -> list[str]:
    pts = " ".join(f"{x},{y}" for x, y in a.points)
    dash = ' stroke-dasharray="6,4"' if a.dashed else ""
    out = [f'<polyline points="{pts}" fill="none" stroke="{a.color}" stroke-width="2"{dash} '
           f'marker-end="url(#head-{a.color[1:]})"/>']
    if a.step:
        (x0, y0), (x1, y1) = a.points[0], a.points[-1]
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        out += [f'<circle cx="{cx}" cy="{cy}" r="10" fill="#1f4e79"/>',
                _text(cx, cy + 4, str(a.step), 12, "bold", anchor="middle", color="#ffffff")]
    return out


def render() -> str:
    colors = sorted({a.color for a in ARROWS})
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}">', "<defs>"]
    out += [f'<marker id="head-{c[1:]}" markerWidth="10" markerHeight="8" refX="9" refY="4" '
            f'orient="auto"><path d="M0,0 L10,4 L0,8 z" fill="{c}"/></marker>' for c in colors]
    out += ["</defs>", f'<rect width="{W}" height="{H}" fill="#ffffff"/>',
            _text(20, 30, "SpecEdge on NATS: edges draft, verifiers verify in batches, the "
                  "broker carries only token ids", 16, "bold")]
    for b in (*EDGES, BROKER, STREAM, KV, FLEET, *VERIFIERS):
        out += _box(b)
    for a in ARROWS:
        out += _arrow(a)
    out.append(_text(20, 650, "One round of one session (alice); bob's blocks share "
                     "the same forwards:", 13, "bold"))
    out += [_text(20, 674 + 20 * i, line, 12) for i, line in enumerate(LEGEND)]
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main() -> int:
    OUT.write_text(render())
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
