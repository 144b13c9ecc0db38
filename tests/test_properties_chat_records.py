"""Properties of the SixChat record layer (sixnet/chat/records.py), the parser of everything a
peer sends once a session is up: any bytes, cut anywhere, give opened records and at most one
`Alert` (never an exception), quickly, holding at most one record's worth of bytes; sealed
records come back exactly, however the network cuts them; and a changed byte is never opened
into a different plaintext."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st

from sixnet.chat.alerts import Alert
from sixnet.chat.keyschedule import TrafficKeys
from sixnet.chat.records import (
    APPLICATION,
    CIPHERS,
    HEADER,
    KEY_UPDATE,
    MAX_CIPHERTEXT,
    RecordLayer,
)
from tests.support.properties import MAX_SECONDS

ciphers = st.sampled_from(sorted(CIPHERS))
secrets = st.binary(min_size=32, max_size=32)
cuts = st.lists(st.integers(0, 1 << 20), max_size=10)


def pair(cipher: str, a: bytes, b: bytes) -> tuple[RecordLayer, RecordLayer]:
    """A sender and the receiver holding the same keys."""
    forward, backward = TrafficKeys.from_secret(a), TrafficKeys.from_secret(b)
    return RecordLayer(cipher, forward, backward), RecordLayer(cipher, backward, forward)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


def receive(layer: RecordLayer, chunks: list[bytes]) -> tuple[list[tuple[int, bytes]],
                                                                Alert | None]:
    """Feed every chunk until an alert; what was opened, and the alert."""
    opened: list[tuple[int, bytes]] = []
    for chunk in chunks:
        started = time.process_time()
        records, alert = layer.feed(chunk)
        assert time.process_time() - started < MAX_SECONDS
        assert len(layer._buffer) < HEADER.size + MAX_CIPHERTEXT
        opened += records
        if alert is not None:
            assert alert.condition in {"unexpected-message", "record-overflow",
                                       "bad-record-mac", "decode-error"}
            return opened, alert
    return opened, None


@given(ciphers, secrets, secrets,
       st.one_of(st.binary(max_size=600),
                 st.builds(lambda t, n, rest: HEADER.pack(t << 24 | n) + rest,
                           st.sampled_from([21, 22, 23, 0, 60, 255]),
                           st.integers(0, (1 << 24) - 1), st.binary(max_size=200))), cuts)
def test_any_bytes_give_records_or_one_alert(cipher: str, a: bytes, b: bytes, data: bytes,
                                             points: list[int]) -> None:
    _, receiver = pair(cipher, a, b)
    opened, _ = receive(receiver, cut(data, points))
    assert opened == []  # nobody without the keys makes a record that opens


@st.composite
def conversations(draw: st.DrawFn) -> list[tuple[int, bytes]]:
    """Application data of any size (split into records) and key updates, in any order."""
    return draw(st.lists(st.one_of(
        st.binary(min_size=1, max_size=300).map(lambda d: (APPLICATION, d)),
        st.integers(1, 3 << 17).map(lambda n: (APPLICATION, b"\xa5" * n)),
        st.booleans().map(lambda requested: (KEY_UPDATE, b"\x01" if requested else b"\x00"))),
        max_size=6))


def sealed(sender: RecordLayer, conversation: list[tuple[int, bytes]]) -> bytes:
    out = b""
    for kind, data in conversation:
        out += (b"".join(sender.seal_application(data)) if kind == APPLICATION
                else sender.seal_key_update(data == b"\x01"))
    return out


@given(ciphers, secrets, secrets, conversations(), cuts)
def test_sealed_records_come_back_however_they_are_cut(
        cipher: str, a: bytes, b: bytes, conversation: list[tuple[int, bytes]],
        points: list[int]) -> None:
    sender, receiver = pair(cipher, a, b)
    opened, alert = receive(receiver, cut(sealed(sender, conversation), points))
    assert alert is None
    assert b"".join(d for k, d in opened if k == APPLICATION) == b"".join(
        d for k, d in conversation if k == APPLICATION)
    assert [d for k, d in opened if k == KEY_UPDATE] == [
        d for k, d in conversation if k == KEY_UPDATE]


@given(ciphers, secrets, secrets, conversations(), st.integers(0, 1 << 30),
       st.integers(0, 7), cuts)
def test_a_changed_byte_is_never_opened_into_other_data(
        cipher: str, a: bytes, b: bytes, conversation: list[tuple[int, bytes]], where: int,
        bit: int, points: list[int]) -> None:
    sender, receiver = pair(cipher, a, b)
    data = bytearray(sealed(sender, conversation))
    if not data:
        return
    data[where % len(data)] ^= 1 << bit
    opened, alert = receive(receiver, cut(bytes(data), points))
    sent = b"".join(d for k, d in conversation if k == APPLICATION)
    updates = [d for k, d in conversation if k == KEY_UPDATE]
    application = b"".join(d for k, d in opened if k == APPLICATION)
    assert sent.startswith(application)
    # the changed record does not open: the stream stops there with an alert, or waits for
    # a length the change made longer than what was sent; either way not all came through
    assert alert is not None or (application, [d for k, d in opened if k == KEY_UPDATE]) \
        != (sent, updates)
