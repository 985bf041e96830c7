"""The model-execution layer shared by the edge and the verifier: the paged KV pool, the
packed forward with one attention call per layer, tree masks, sampling and the walk."""

from specedge.execution.plan import Segment
from specedge.execution.pool import KVPool, KVSeq, PoolFull
from specedge.execution.runner import PackedRunner

__all__ = ["KVPool", "KVSeq", "PackedRunner", "PoolFull", "Segment"]
