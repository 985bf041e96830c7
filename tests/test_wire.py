import msgspec
import pytest

from schemas import (
    SCHEMA_VERSION,
    DraftBlock,
    Rejected,
    Sampling,
    SessionClosed,
    SessionOpened,
    Verdict,
    WireError,
    decode,
    encode,
    pack_ids,
    unpack_ids,
)


def samples():
    return [
        SessionOpened(v=SCHEMA_VERSION, prompt=pack_ids([1, 2, 151_000]), sampling=Sampling(0.7, 0.9, 20),
                      seed=5, max_new_tokens=64, eos_ids=pack_ids([7]), target="t", draft="d",
                      vocab_size=151_936, t=1.5),
        SessionClosed(v=SCHEMA_VERSION, reason="done"),
        DraftBlock(v=SCHEMA_VERSION, round=3, committed_len=10, root=9, tokens=pack_ids([4, 5, 6]),
                   parents=pack_ids([0, 1, 1])),
        Verdict(v=SCHEMA_VERSION, round=3, committed_len=10, accepted=pack_ids([1, 3]),
                tokens=pack_ids([4, 6, 8]), next_token=8, bonus=False, finished=False),
        Rejected(v=SCHEMA_VERSION, round=3, code="stale", reason="old"),
    ]


@pytest.mark.parametrize("msg", samples(), ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    data = encode(msg)
    assert decode(data) == msg
    assert type(decode(data)) is type(msg)


def test_ids_are_packed_int32():
    assert pack_ids([1, -2, 2**31 - 1]) == b"\x01\x00\x00\x00\xfe\xff\xff\xff\xff\xff\xff\x7f"
    assert unpack_ids(pack_ids([3, 0, 151_935])) == [3, 0, 151_935]
    with pytest.raises(ValueError):
        unpack_ids(b"\x01\x02\x03")


def test_bad_bodies_are_wire_errors():
    with pytest.raises(WireError):
        decode(b"\xff\x00garbage")
    with pytest.raises(WireError):  # unknown tag
        decode(msgspec.msgpack.encode({"type": "pickle", "v": 1}))
    with pytest.raises(WireError, match="schema version"):
        decode(encode(SessionClosed(v=SCHEMA_VERSION + 1)))
    with pytest.raises(WireError):  # wrong field type
        decode(msgspec.msgpack.encode({"type": "draft", "v": 1, "round": "x", "committed_len": 1,
                                       "root": 1, "tokens": b"", "parents": b""}))
