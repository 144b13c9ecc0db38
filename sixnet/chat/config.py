"""The ``[chat]`` section."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sixnet.chat.policy import entries_check
from sixnet.core.config import Settings
from sixnet.core.settings import (
    ServiceConfig,
    database_url,
    endpoints_check,
    in_range,
    positive,
    setting,
)

KEY_AGREEMENTS = ("x25519", "rsa-oaep")
CIPHERS = ("aes-256-gcm", "chacha20-poly1305")


def preference_list(choices: tuple[str, ...]) -> Callable[[list[str]], str | None]:
    def check(values: list[str]) -> str | None:
        if not values:
            return "must name at least one of " + ", ".join(choices)
        for value in values:
            if value not in choices:
                return f"{value!r} is not one of {', '.join(choices)}"
        if len(set(values)) != len(values):
            return "names a method twice"
        return None

    return check


def _address_problem(value: str, *, ip_only: bool) -> str | None:
    import ipaddress

    from sixnet.chat.directory import PeerAddress

    try:
        address = PeerAddress.parse(value)
    except ValueError as e:
        return str(e)
    if ip_only:
        try:
            ipaddress.ip_address(address.host)
        except ValueError:
            return f"{value!r}: IRP registers IP addresses, not host names"
    return None


def addresses_check(values: list[str]) -> str | None:
    for value in values:
        problem = _address_problem(value, ip_only=True)
        if problem:
            return problem
    return None


def server_address_check(value: str) -> str | None:
    return _address_problem(value, ip_only=False)


def device_check(value: str) -> str | None:
    import re

    if re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
        return None
    return f"{value!r} must be 1-64 of A-Z a-z 0-9 . _ -"


def size_check(value: int) -> str | None:
    return None if 1 <= value <= 1 << 20 else f"{value} is out of range 1-1048576"


@dataclass(frozen=True)
class ChatConfig(ServiceConfig):
    """``[chat]``: the SixChat End2End Direct user agent (TCP 4605)."""

    listen: list[str] = setting(["tcp6:4605:interface=\\:\\:"], check=endpoints_check)
    identity: str = setting("user")
    database: str = setting("sqlite:chat.sqlite", check=database_url,
                            doc="sqlite:PATH (relative to state_dir) or a postgresql:// URL")
    control_socket: str = setting("chat/control.sock",
                                  doc="the UNIX control socket, relative to state_dir")
    irp_server: str = setting("localhost:4604", check=server_address_check,
                              doc="host:port of the IRP registry")
    irp_server_name: str = setting("", doc="the registry certificate's host name; "
                                           "empty: the host of irp_server")
    device: str = setting("chat", check=device_check,
                          doc="the device label this agent registers its addresses under")
    advertise: list[str] = setting([], check=addresses_check,
                                   doc="ip:port addresses to register; empty: discover")
    registration_lifetime: float = setting(3600.0, check=positive)
    address_check_interval: float = setting(60.0, check=positive)
    handshake_timeout: float = setting(10.0, check=positive)
    max_handshakes_per_address: int = setting(8, check=in_range(1, 10000),
                                              doc="handshakes under way from one address")
    max_handshakes: int = setting(64, check=in_range(1, 100000),
                                  doc="handshakes under way from all addresses together")
    allow: list[str] = setting([], check=entries_check,
                               doc="people and domains this agent talks with; empty: anyone "
                                   "a trusted CA certified")
    deny: list[str] = setting([], check=entries_check,
                              doc="people and domains this agent refuses")
    connect_timeout: float = setting(10.0, check=positive)
    retry_initial: float = setting(5.0, check=positive)
    retry_max: float = setting(300.0, check=positive)
    max_message_bytes: int = setting(65536, check=size_check)
    key_update_bytes: int = setting(1 << 30, check=lambda v: None if v >= 1024
                                    else f"{v} is below 1024")
    key_agreement: list[str] = setting(list(KEY_AGREEMENTS),
                                       check=preference_list(KEY_AGREEMENTS))
    ciphers: list[str] = setting(list(CIPHERS), check=preference_list(CIPHERS))


class ChatSettings(Settings, Protocol):
    """What the chat agent reads of the whole file (the composition root's aggregate has it)."""

    @property
    def chat(self) -> ChatConfig: ...
