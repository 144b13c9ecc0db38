"""The binary record layer of an established SixChat session (docs/chat.rst, "The record phase").

``type:u8 | length:u24 | AEAD ciphertext``; the nonce is the direction's IV XOR the implicit
record sequence number, so a replayed, reordered, dropped or altered record fails to
authenticate. A plain object: bytes in, records out; it never touches a socket.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from sixnet.chat.alerts import Alert
from sixnet.chat.keyschedule import TrafficKeys

ALERT = 21
KEY_UPDATE = 22
APPLICATION = 23
RECORD_TYPES = (ALERT, KEY_UPDATE, APPLICATION)

MAX_PLAINTEXT = 1 << 17
TAG_LEN = 16
MAX_CIPHERTEXT = MAX_PLAINTEXT + TAG_LEN
HEADER = struct.Struct(">I")  # type in the top byte, length in the low 24 bits
#: Keys are updated well before the sequence number could matter for the nonce.
MAX_RECORDS_PER_KEY = 1 << 32

CIPHERS = {"aes-256-gcm": AESGCM, "chacha20-poly1305": ChaCha20Poly1305}


class _Direction:
    """One direction's AEAD object (made once per key generation), IV and sequence number."""

    __slots__ = ("aead", "bytes", "iv", "keys", "seq")

    def __init__(self, cipher: str, keys: TrafficKeys) -> None:
        self.keys = keys
        self.aead = CIPHERS[cipher](keys.key)
        self.iv = int.from_bytes(keys.iv, "big")
        self.seq = 0
        self.bytes = 0

    def nonce(self) -> bytes:
        nonce = (self.iv ^ self.seq).to_bytes(12, "big")
        self.seq += 1
        return nonce


class RecordLayer:
    """Seals outgoing records and opens incoming ones for one session."""

    def __init__(self, cipher: str, send: TrafficKeys, receive: TrafficKeys, *,
                 key_update_bytes: int = 1 << 30) -> None:
        if cipher not in CIPHERS:
            raise ValueError(f"unknown cipher {cipher!r}")
        self.cipher = cipher
        self._send = _Direction(cipher, send)
        self._receive = _Direction(cipher, receive)
        self._buffer = bytearray()
        self.key_update_bytes = key_update_bytes

    # -- sending -----------------------------------------------------------------------------

    def seal(self, record_type: int, plaintext: bytes) -> bytes:
        """One record; `plaintext` must be 1..MAX_PLAINTEXT bytes."""
        size = len(plaintext)
        if not 0 < size <= MAX_PLAINTEXT:
            raise ValueError(f"record plaintext of {size} bytes")
        header = HEADER.pack(record_type << 24 | (size + TAG_LEN))
        direction = self._send
        direction.bytes += size
        return header + direction.aead.encrypt(direction.nonce(), plaintext, header)

    def seal_application(self, data: bytes) -> list[bytes]:
        """Application bytes as records of at most MAX_PLAINTEXT each."""
        if len(data) <= MAX_PLAINTEXT:
            return [self.seal(APPLICATION, data)]
        view = memoryview(data)
        return [self.seal(APPLICATION, bytes(view[i:i + MAX_PLAINTEXT]))
                for i in range(0, len(data), MAX_PLAINTEXT)]

    @property
    def needs_key_update(self) -> bool:
        direction = self._send
        return (direction.bytes >= self.key_update_bytes
                or direction.seq >= MAX_RECORDS_PER_KEY - 1)

    def seal_key_update(self, requested: bool) -> bytes:
        """The key-update record, sealed under the old keys; later records use the new ones."""
        record = self.seal(KEY_UPDATE, b"\x01" if requested else b"\x00")
        self._send = _Direction(self.cipher, self._send.keys.next())
        return record

    # -- receiving ---------------------------------------------------------------------------

    def feed(self, data: bytes) -> tuple[list[tuple[int, bytes]], Alert | None]:
        """Open every complete record in the data received so far.

        Returns the ``(type, plaintext)`` pairs opened and the alert that stopped the loop,
        if any (the records before a bad one are good and are still delivered). A key-update
        record is applied here and still returned, so the session can answer a request.
        """
        out: list[tuple[int, bytes]] = []
        try:
            self._open(data, out)
        except Alert as alert:
            self._buffer.clear()
            return out, alert
        return out, None

    def _open(self, data: bytes, out: list[tuple[int, bytes]]) -> None:
        buffer = self._buffer
        buffer += data
        offset = 0
        end = len(buffer)
        while end - offset >= 4:
            (word,) = HEADER.unpack_from(buffer, offset)
            record_type, length = word >> 24, word & 0xFFFFFF
            if record_type not in RECORD_TYPES:
                raise Alert("unexpected-message", f"unknown record type {record_type}")
            if not TAG_LEN < length <= MAX_CIPHERTEXT:
                raise Alert("record-overflow", f"record of {length} bytes")
            stop = offset + 4 + length
            if stop > end:
                break
            header = bytes(buffer[offset:offset + 4])
            direction = self._receive
            try:
                plaintext = direction.aead.decrypt(direction.nonce(),
                                                   bytes(buffer[offset + 4:stop]), header)
            except InvalidTag:
                raise _unauthentic(direction, bytes(buffer[offset + 4:stop]), header) from None
            offset = stop
            if record_type == KEY_UPDATE:
                if plaintext not in (b"\x00", b"\x01"):
                    raise Alert("decode-error", "bad key-update record")
                self._receive = _Direction(self.cipher, direction.keys.next())
            out.append((record_type, plaintext))
        if offset:
            del buffer[:offset]


#: How far from the expected sequence number a failed record is tried again, to tell a
#: replayed or a missing record from a tampered one (only ever done once, as a session ends).
SEQUENCE_WINDOW = 32


def _unauthentic(direction: _Direction, ciphertext: bytes, header: bytes) -> Alert:
    """The alert for a record that fails to authenticate as record `seq`: it opens as an
    earlier record (replayed), as a later one (records dropped), or not at all (tampered)."""
    expected = direction.seq - 1
    for offset in range(1, SEQUENCE_WINDOW + 1):
        for seq, event in ((expected - offset, "chat.record-replayed"),
                           (expected + offset, "chat.record-dropped")):
            if seq < 0:
                continue
            try:
                direction.aead.decrypt((direction.iv ^ seq).to_bytes(12, "big"), ciphertext,
                                       header)
            except InvalidTag:
                continue
            what = "replayed" if seq < expected else f"{seq - expected} missing before it"
            return Alert("bad-record-mac", f"record {expected} does not authenticate: it is "
                                           f"record {seq} ({what})", event=event,
                         facts={"expected": str(expected), "found": str(seq)})
    return Alert("bad-record-mac", f"record {expected} does not authenticate",
                 event="chat.record-tampered", facts={"expected": str(expected)})
