"""The broker's persistent state as data: what the engine changed, and what it loads at start.

The engine returns a list of these with every outcome; the store writes them in one
transaction before the requester is told the request succeeded.
"""

from __future__ import annotations

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
