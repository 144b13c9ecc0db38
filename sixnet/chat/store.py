"""Messages on disk: the outbox, the inbox and the history are one table.

An outgoing message is committed before the person is told it is queued, and stays
``queued`` until the peer's receipt arrives; an incoming one is committed before the receipt
is sent. Both are on disk (SQLite WAL, synchronous=FULL) once their Deferred fires.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from twisted.internet import defer

from sixnet.core.storage.database import Cursor, Database
from sixnet.core.timefmt import rfc3339

MIGRATIONS = {
    1: [
        """CREATE TABLE chat_messages (
               seq {serial},
               id TEXT NOT NULL,
               peer TEXT NOT NULL,
               direction TEXT NOT NULL,
               body TEXT NOT NULL,
               sent TEXT NOT NULL,
               stored REAL NOT NULL,
               state TEXT NOT NULL,
               delivered REAL,
               UNIQUE (direction, peer, id))""",
        "CREATE INDEX chat_messages_state ON chat_messages (direction, state, peer)",
    ],
}

_COLUMNS = "seq, id, peer, direction, body, sent, stored, state, delivered"


@dataclass(frozen=True)
class StoredMessage:
    seq: int
    id: str
    peer: str
    direction: str  # "out" or "in"
    body: str
    sent: str  # RFC 3339, the sender's clock
    stored: float
    state: str  # out: "queued" | "delivered"; in: "received"
    delivered: float | None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _row(row: tuple[Any, ...]) -> StoredMessage:
    return StoredMessage(*row)


class MessageStore:
    """The agent's messages in a `Database`."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def migrate(self) -> defer.Deferred[int]:
        return self.db.migrate("chat", MIGRATIONS)

    def queue(self, peer: str, body: str) -> defer.Deferred[StoredMessage]:
        """Commit a new outgoing message; it is ``queued`` until the peer's receipt."""
        message_id, sent, stored = str(uuid.uuid4()), rfc3339(), time.time()

        def txn(c: Cursor) -> StoredMessage:
            c.execute("INSERT INTO chat_messages (id, peer, direction, body, sent, stored, "
                      "state) VALUES (?, ?, 'out', ?, ?, ?, 'queued')",
                      (message_id, peer, body, sent, stored))
            row = c.execute(f"SELECT {_COLUMNS} FROM chat_messages WHERE direction = 'out' "  # noqa: S608
                            "AND peer = ? AND id = ?", (peer, message_id)).fetchone()
            assert row is not None
            return _row(row)

        return self.db.run("chat queue", txn)

    def receive(self, peer: str, message_id: str, sent: str,
                body: str) -> defer.Deferred[tuple[StoredMessage, bool]]:
        """Commit an incoming message; (message, True) the first time, (stored, False) after."""

        def txn(c: Cursor) -> tuple[StoredMessage, bool]:
            select = (f"SELECT {_COLUMNS} FROM chat_messages WHERE direction = 'in' "  # noqa: S608
                      "AND peer = ? AND id = ?")
            row = c.execute(select, (peer, message_id)).fetchone()
            if row is not None:
                return _row(row), False
            c.execute("INSERT INTO chat_messages (id, peer, direction, body, sent, stored, "
                      "state) VALUES (?, ?, 'in', ?, ?, ?, 'received')",
                      (message_id, peer, body, sent, time.time()))
            row = c.execute(select, (peer, message_id)).fetchone()
            assert row is not None
            return _row(row), True

        return self.db.run("chat receive", txn)

    def mark_delivered(self, peer: str, message_id: str) -> defer.Deferred[StoredMessage | None]:
        """Record the peer's receipt; the message if it was queued, else None."""

        def txn(c: Cursor) -> StoredMessage | None:
            c.execute("UPDATE chat_messages SET state = 'delivered', delivered = ? "
                      "WHERE direction = 'out' AND peer = ? AND id = ? AND state = 'queued'",
                      (time.time(), peer, message_id))
            if c.rowcount != 1:
                return None
            row = c.execute(f"SELECT {_COLUMNS} FROM chat_messages WHERE direction = 'out' "  # noqa: S608
                            "AND peer = ? AND id = ?", (peer, message_id)).fetchone()
            return _row(row) if row else None

        return self.db.run("chat delivered", txn)

    def outbox(self, peer: str | None = None) -> defer.Deferred[list[StoredMessage]]:
        where, args = ("AND peer = ?", (peer,)) if peer else ("", ())

        def txn(c: Cursor) -> list[StoredMessage]:
            return [_row(r) for r in c.execute(
                f"SELECT {_COLUMNS} FROM chat_messages WHERE direction = 'out' "  # noqa: S608
                f"AND state = 'queued' {where} ORDER BY seq", args).fetchall()]

        return self.db.run("chat outbox", txn)

    def messages(self, *, direction: str | None = None, peer: str | None = None,
                 limit: int = 50) -> defer.Deferred[list[StoredMessage]]:
        """The latest `limit` messages (oldest first), optionally one direction or peer."""
        clauses, args = [], []
        if direction:
            clauses.append("direction = ?")
            args.append(direction)
        if peer:
            clauses.append("peer = ?")
            args.append(peer)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""

        def txn(c: Cursor) -> list[StoredMessage]:
            rows = c.execute(f"SELECT {_COLUMNS} FROM chat_messages {where} "  # noqa: S608
                             "ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()
            return [_row(r) for r in reversed(rows)]

        return self.db.run("chat messages", txn)

    def queued_counts(self) -> defer.Deferred[dict[str, int]]:
        def txn(c: Cursor) -> dict[str, int]:
            return dict(c.execute("SELECT peer, COUNT(*) FROM chat_messages WHERE direction = "
                                  "'out' AND state = 'queued' GROUP BY peer").fetchall())

        return self.db.run("chat queued counts", txn)
