"""The broker's persistent state as data: what the engine changed, and what it loads at start.

The engine returns a list of these with every outcome; the store writes them in one
transaction before the requester is told the request succeeded. On a shared database
(PostgreSQL) the same transaction announces them on `CHANNEL` (`encode`), so every other
broker instance on that database applies them to its own state (`decode`) as they commit.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PutNode:
    name: str
    config: str  # NodeConfig.to_json()
    created: str
    creator: str


@dataclass(frozen=True)
class DeleteNode:
    name: str


@dataclass(frozen=True)
class PutAffiliation:
    node: str
    jid: str
    affiliation: str  # "none" removes the row


@dataclass(frozen=True)
class PutSubscription:
    node: str
    subid: str
    jid: str
    state: str  # subscribed | pending
    deliver: bool
    position: int


@dataclass(frozen=True)
class DeleteSubscription:
    node: str
    subid: str


@dataclass(frozen=True)
class PutItem:
    node: str
    item_id: str
    position: int
    publisher: str
    payload: bytes
    published: str


@dataclass(frozen=True)
class DeleteItem:
    node: str
    item_id: str


@dataclass(frozen=True)
class PurgeItems:
    node: str


Change = (PutNode | DeleteNode | PutAffiliation | PutSubscription | DeleteSubscription
          | PutItem | DeleteItem | PurgeItems)


@dataclass
class Snapshot:
    """Everything the store holds, in the order the engine rebuilds it."""

    nodes: list[PutNode] = field(default_factory=list)
    affiliations: list[PutAffiliation] = field(default_factory=list)
    subscriptions: list[PutSubscription] = field(default_factory=list)  # by position
    items: list[PutItem] = field(default_factory=list)  # by position


#: The channel on which committed change lists are announced to the other instances.
CHANNEL = "pubsub_change"
#: A notification's payload stays under PostgreSQL's limit of 8000 bytes.
MAX_NOTIFICATION = 7800
#: Item payloads up to this size travel in the notification; larger ones are read from the
#: store by whoever hears it.
INLINE_PAYLOAD = 3000
_KINDS = {cls.__name__: cls for cls in (PutNode, DeleteNode, PutAffiliation, PutSubscription,
                                        DeleteSubscription, PutItem, DeleteItem, PurgeItems)}


def _record(change: Change) -> dict:
    record = {"k": type(change).__name__, **dataclasses.asdict(change)}
    if isinstance(change, PutItem):
        inline = len(change.payload) <= INLINE_PAYLOAD
        record["payload"] = base64.b64encode(change.payload).decode() if inline else None
    return record


def encode(origin: str, changes: Sequence[Change], counter: int) -> list[str]:
    """One change list as notification payloads, in order, each under `MAX_NOTIFICATION`.

    Every payload carries a counter: PostgreSQL folds identical payloads of one transaction.
    """
    messages: list[str] = []
    records: list[dict] = []

    def dump(batch: list[dict]) -> str:
        return json.dumps({"o": origin, "n": counter + len(messages), "c": batch},
                          separators=(",", ":"))

    for change in changes:
        record = _record(change)
        if records and len(dump([*records, record])) > MAX_NOTIFICATION:
            messages.append(dump(records))
            records = []
        records.append(record)
    if records:
        messages.append(dump(records))
    return messages


@dataclass(frozen=True)
class Announced:
    """A change list another instance committed; `missing` are the items whose payload
    was too large to travel with it (read from the store)."""

    origin: str
    changes: list[Change]
    missing: list[PutItem]


def decode(payload: str) -> Announced:
    message = json.loads(payload)
    changes: list[Change] = []
    missing: list[PutItem] = []
    for record in message["c"]:
        kind = _KINDS[record.pop("k")]
        if kind is PutItem:
            data = record.pop("payload")
            item = PutItem(payload=base64.b64decode(data) if data is not None else b"",
                           **record)
            if data is None:
                missing.append(item)
            changes.append(item)
        else:
            changes.append(kind(**record))
    return Announced(message["o"], changes, missing)
