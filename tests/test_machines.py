"""Every negotiation machine's table, enumerated: each state x input is allowed (to the state
and outputs written here), refused (ends the stream with the state's error), ignored (the
stream is over) or impossible (no transition: the stream layer never delivers it)."""

from __future__ import annotations

from typing import Any

import pytest

from sixnet.grid.client.stream import ClientStream as GridClientStream
from sixnet.grid.stream import ClientStream, State
from sixnet.irp.client import _ClientProtocol
from sixnet.irp.protocol import IRPServerProtocol


def table(cls: Any) -> dict[tuple[Any, str], tuple[Any, tuple[str, ...]]]:
    automaton = cls._machine._automaton
    return {(state.serialized, symbol.method.__name__):
            (end.serialized, tuple(o.method.__name__ for o in outputs))
            for state, symbol, end, outputs in automaton.allTransitions()}


def cells(cls: Any) -> set[tuple[Any, str]]:
    automaton = cls._machine._automaton
    return {(s.serialized, i.method.__name__)
            for s in automaton.states() for i in automaton.inputAlphabet()}


def expected(allowed: dict, refused: dict, closed: Any, inputs: tuple[str, ...],
             always: tuple[str, ...]) -> dict:
    """`allowed` as written; `refused`: state -> (refusal output, inputs it refuses);
    `closed` ignores every input; `always` (the end of the stream) from every state."""
    rows = dict(allowed)
    for state, (output, names) in refused.items():
        for name in names:
            rows[state, name] = (closed, (output,))
    states = {s for s, _ in rows} | set(refused)
    for state in states - {closed}:
        for name in always:
            rows[state, name] = (closed, ())
    for name in inputs:
        rows[closed, name] = (closed, ())
    return rows


GRID_ELEMENTS = ("got_starttls", "got_auth", "got_response", "got_abort", "got_bind",
                 "got_session_iq", "got_stanza", "got_enable", "got_resume", "got_r", "got_a",
                 "got_unknown")
GRID_INPUTS = (*GRID_ELEMENTS, "got_header", "tls_up", "sasl_succeeded", "session_started",
               "end")
GRID_ALLOWED = {
    (State.HEADER, "got_header"): (State.STARTTLS, ("_offer_starttls",)),
    (State.HEADER, "tls_up"): (State.TLS_HEADER, ()),
    (State.STARTTLS, "got_starttls"): (State.TLS_HANDSHAKE, ("_proceed",)),
    (State.TLS_HANDSHAKE, "tls_up"): (State.TLS_HEADER, ()),
    (State.TLS_HEADER, "got_header"): (State.AUTH, ("_offer_sasl",)),
    (State.AUTH, "got_auth"): (State.AUTH, ("_on_auth",)),
    (State.AUTH, "got_response"): (State.AUTH, ("_on_response",)),
    (State.AUTH, "got_abort"): (State.AUTH, ("_on_abort",)),
    (State.AUTH, "sasl_succeeded"): (State.AUTHENTICATED_HEADER, ()),
    (State.AUTHENTICATED_HEADER, "got_header"): (State.BIND, ("_offer_bind",)),
    (State.BIND, "got_bind"): (State.BIND, ("_on_bind",)),
    (State.BIND, "got_resume"): (State.BIND, ("_on_resume",)),
    (State.BIND, "got_enable"): (State.BIND, ("_sm_too_early",)),
    (State.BIND, "session_started"): (State.SESSION, ("_negotiated",)),
    (State.SESSION, "got_stanza"): (State.SESSION, ("_on_stanza",)),
    (State.SESSION, "got_bind"): (State.SESSION, ("_on_bind_again",)),
    (State.SESSION, "got_session_iq"): (State.SESSION, ("_on_legacy_session",)),
    (State.SESSION, "got_enable"): (State.SESSION, ("_on_enable",)),
    (State.SESSION, "got_r"): (State.SESSION, ("_on_ack_request",)),
    (State.SESSION, "got_a"): (State.SESSION, ("_on_ack",)),
    (State.SESSION, "got_resume"): (State.SESSION, ("_sm_too_early",)),
    # RFC 6120 5.3.1: SASL before TLS is told why, then refused.
    (State.STARTTLS, "got_auth"): (State.CLOSED, ("_encryption_required",)),
}


def _but(*names: str) -> tuple[str, ...]:
    return tuple(n for n in GRID_ELEMENTS if n not in names)


GRID_REFUSED = {
    State.HEADER: ("_header_first", GRID_ELEMENTS),
    State.TLS_HEADER: ("_header_first", GRID_ELEMENTS),
    State.AUTHENTICATED_HEADER: ("_header_first", GRID_ELEMENTS),
    State.STARTTLS: ("_starttls_first", _but("got_starttls", "got_auth")),
    State.AUTH: ("_authenticate_first", _but("got_auth", "got_response", "got_abort")),
    State.BIND: ("_bind_first", _but("got_bind", "got_resume", "got_enable")),
    State.SESSION: ("_not_a_stanza", ("got_starttls", "got_auth", "got_response",
                                      "got_abort", "got_unknown")),
}
GRID_UNEXPECTED_HEADER = (State.STARTTLS, State.TLS_HANDSHAKE, State.AUTH, State.BIND,
                          State.SESSION)


def grid_expected() -> dict:
    rows = expected(GRID_ALLOWED, GRID_REFUSED, State.CLOSED, GRID_INPUTS, ("end",))
    for state in GRID_UNEXPECTED_HEADER:
        rows[state, "got_header"] = (State.CLOSED, ("_unexpected_header",))
    rows[State.TLS_HANDSHAKE, "end"] = (State.CLOSED, ())
    return rows


IRP_SERVER_INPUTS = ("got_header", "got_starttls", "got_element", "tls_up", "caller_judged",
                     "end")
IRP_SERVER_ALLOWED = {
    ("clear", "got_header"): ("offered", ("_offer_starttls",)),
    ("offered", "got_starttls"): ("handshake", ("_proceed",)),
    ("handshake", "tls_up"): ("handshake", ("_judge_certificate",)),
    ("handshake", "caller_judged"): ("authenticated", ("_release",)),
    ("authenticated", "got_header"): ("open", ("_open_session",)),
    ("open", "got_element"): ("open", ("_dispatch",)),
    ("open", "got_starttls"): ("open", ("_dispatch",)),  # answered as an unknown operation
}
IRP_SERVER_REFUSED = {
    "clear": ("_header_first", ("got_starttls", "got_element")),
    "authenticated": ("_header_first", ("got_starttls", "got_element")),
    "offered": ("_starttls_first", ("got_element",)),
}


def irp_server_expected() -> dict:
    rows = expected(IRP_SERVER_ALLOWED, IRP_SERVER_REFUSED, "closed", IRP_SERVER_INPUTS,
                    ("end",))
    for state in ("offered", "open"):
        rows[state, "got_header"] = ("closed", ("_unexpected_header",))
    return rows


IRP_CLIENT_ELEMENTS = ("got_features", "got_proceed", "got_session", "got_response",
                       "got_notify", "got_other")
IRP_CLIENT_INPUTS = (*IRP_CLIENT_ELEMENTS, "got_stream_error", "server_verified", "end")
IRP_CLIENT_ALLOWED = {
    ("clear", "got_features"): ("starttls", ("_ask_starttls",)),
    ("starttls", "got_proceed"): ("handshake", ("_start_tls",)),
    ("handshake", "server_verified"): ("open", ()),
    ("open", "got_session"): ("open", ("_deliver_session",)),
    ("open", "got_response"): ("open", ("_deliver_response",)),
    ("open", "got_notify"): ("open", ("_deliver_notification",)),
}


def irp_client_expected() -> dict:
    accepted = {"clear": ("got_features",), "starttls": ("got_proceed",), "handshake": (),
                "open": ("got_session", "got_response", "got_notify")}
    refused = {state: ("_unexpected", tuple(n for n in IRP_CLIENT_ELEMENTS if n not in names))
               for state, names in accepted.items()}
    rows = expected(IRP_CLIENT_ALLOWED, refused, "closed", IRP_CLIENT_INPUTS, ("end",))
    for state in accepted:
        rows[state, "got_stream_error"] = ("closed", ("_registry_refused",))
    return rows


GRID_CLIENT_ELEMENTS = ("got_features", "got_proceed", "got_tls_failure", "got_challenge",
                        "got_success", "got_sasl_failure", "got_stanza", "got_other")
GRID_CLIENT_INPUTS = (*GRID_CLIENT_ELEMENTS, "got_stream_error", "go_direct", "tls_verified",
                      "bound", "needs_session", "end")
GRID_CLIENT_ALLOWED = {
    ("clear", "go_direct"): ("tls-handshake", ("_start_direct",)),
    ("clear", "got_features"): ("starttls", ("_ask_starttls",)),
    ("starttls", "got_proceed"): ("tls-handshake", ("_start_tls",)),
    ("starttls", "got_tls_failure"): ("closed", ("_tls_refused",)),
    ("tls-handshake", "tls_verified"): ("tls-features", ("_send_header",)),
    ("tls-features", "got_features"): ("sasl", ("_authenticate",)),
    ("sasl", "got_challenge"): ("sasl", ("_respond",)),
    ("sasl", "got_success"): ("bound-features", ("_authenticated",)),
    ("sasl", "got_sasl_failure"): ("closed", ("_sasl_refused",)),
    ("bound-features", "got_features"): ("binding", ("_bind",)),
    ("binding", "got_stanza"): ("binding", ("_bind_answer",)),
    ("binding", "bound"): ("ready", ("_ready",)),
    ("binding", "needs_session"): ("session-iq", ()),
    ("session-iq", "got_stanza"): ("session-iq", ("_session_answer",)),
    ("session-iq", "bound"): ("ready", ("_ready",)),
    ("ready", "got_stanza"): ("ready", ("_deliver",)),
    ("ready", "got_other"): ("ready", ("_ignore",)),
}
GRID_CLIENT_ACCEPTED = {
    "clear": ("got_features",), "starttls": ("got_proceed", "got_tls_failure"),
    "tls-handshake": (), "tls-features": ("got_features",),
    "sasl": ("got_challenge", "got_success", "got_sasl_failure"),
    "bound-features": ("got_features",), "binding": ("got_stanza",),
    "session-iq": ("got_stanza",), "ready": ("got_stanza", "got_other"),
}


def grid_client_expected() -> dict:
    refused = {state: ("_unexpected", tuple(n for n in GRID_CLIENT_ELEMENTS if n not in names))
               for state, names in GRID_CLIENT_ACCEPTED.items()}
    rows = expected(GRID_CLIENT_ALLOWED, refused, "closed", GRID_CLIENT_INPUTS, ("end",))
    for state in GRID_CLIENT_ACCEPTED:
        rows[state, "got_stream_error"] = ("closed", ("_server_error",))
    return rows


MACHINES = {
    "grid c2s": (ClientStream, grid_expected),
    "grid client": (GridClientStream, grid_client_expected),
    "IRP server": (IRPServerProtocol, irp_server_expected),
    "IRP client": (_ClientProtocol, irp_client_expected),
}
#: Cells with no transition, and why the stream never delivers that input there.
IMPOSSIBLE = {
    "grid c2s": {
        # Elements and headers during the handshake: data before it completes is refused as
        # cleartext by the stream layer. tls_up comes once, only after startTLS or direct TLS;
        # sasl_succeeded only in AUTH, session_started only in BIND.
        *((State.TLS_HANDSHAKE, n) for n in GRID_ELEMENTS),
        *((s, "tls_up") for s in State if s not in (State.HEADER, State.TLS_HANDSHAKE,
                                                    State.CLOSED)),
        *((s, "sasl_succeeded") for s in State if s not in (State.AUTH, State.CLOSED)),
        *((s, "session_started") for s in State if s not in (State.BIND, State.CLOSED)),
    },
    "IRP server": {
        # During the handshake and until the caller is judged, events are held back.
        ("handshake", "got_header"), ("handshake", "got_starttls"), ("handshake", "got_element"),
        *((s, "tls_up") for s in ("clear", "offered", "authenticated", "open")),
        *((s, "caller_judged") for s in ("clear", "offered", "authenticated", "open")),
    },
    "IRP client": {
        *((s, "server_verified") for s in ("clear", "starttls", "open")),
    },
    "grid client": {
        # go_direct only right after connecting; tls_verified only after the handshake;
        # bound and needs_session only from the bind (or session) answer.
        *((s, "go_direct") for s in GRID_CLIENT_ACCEPTED if s != "clear"),
        *((s, "tls_verified") for s in GRID_CLIENT_ACCEPTED if s != "tls-handshake"),
        *((s, "bound") for s in GRID_CLIENT_ACCEPTED if s not in ("binding", "session-iq")),
        *((s, "needs_session") for s in GRID_CLIENT_ACCEPTED if s != "binding"),
    },
}


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_the_table_is_as_written(name: str) -> None:
    cls, build = MACHINES[name]
    assert table(cls) == build()


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_every_state_and_input_is_decided(name: str) -> None:
    """No cell is left to chance: each is in the table or named as impossible."""
    cls, _ = MACHINES[name]
    missing = cells(cls) - set(table(cls))
    assert missing == IMPOSSIBLE[name]


# -- the SixChat session (sixnet/chat/session.py) ----------------------------------------------

CHAT_FAIL_ALERT = ("_send_alert", "_hang_up", "_report_alert")
CHAT_FAIL_PEER = ("_hang_up", "_report_peer_alert")
CHAT_CLOSE = ("_send_close_notify", "_hang_up", "_report_closed")
CHAT_HANDSHAKE = {
    "start": {"dial": ("wait_hello", ("_send_initiator_hello",)),
              "initiator_hello": ("wait_verify", ("_answer_hello",))},
    "wait_hello": {"responder_hello": ("wait_verify", ("_accept_hello",))},
    "wait_verify": {"certificate_verify": ("wait_finished", ("_check_peer_verify",))},
    "wait_finished": {"finished": ("established", ("_check_peer_finished", "_complete"))},
}


def chat_expected() -> dict[tuple[str, str], tuple[str, tuple[str, ...]]]:
    """Handshake states: their one step forward, close, refuse, a peer's alert, a lost
    connection. Then the established session, closing, and the two ends."""
    rows: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {}
    for state, steps in CHAT_HANDSHAKE.items():
        rows.update({(state, name): step for name, step in steps.items()})
        rows[state, "close"] = ("closed", CHAT_CLOSE)
    for state in (*CHAT_HANDSHAKE, "established", "closing"):
        rows[state, "refuse"] = ("failed", CHAT_FAIL_ALERT)
        rows[state, "peer_alert"] = ("failed", CHAT_FAIL_PEER)
        rows[state, "connection_lost"] = ("closed", ("_report_lost",))
    rows.update({
        ("established", "key_update_requested"): ("established", ("_answer_key_update",)),
        ("established", "close"): ("closing", ("_send_close_notify",)),
        ("established", "peer_close"): ("closed", CHAT_CLOSE),
        ("closing", "peer_close"): ("closed", ("_hang_up", "_report_closed")),
        ("closing", "key_update_requested"): ("closing", ()),
    })
    for state in ("closed", "failed"):
        rows[state, "close"] = rows[state, "connection_lost"] = (state, ())
    return rows


def test_chat_session_table_is_exactly_the_one_written_here() -> None:
    """Every other state x input is no transition: `Session` answers it with the alert
    unexpected-message (or, once the session is over, ignores it)."""
    from sixnet.chat.session import Session

    automaton = Session._machine._automaton
    actual = {(s.method.__name__, i.method.__name__):
              (e.method.__name__, tuple(o.method.__name__ for o in outputs))
              for s, i, e, outputs in automaton.allTransitions()}
    assert actual == chat_expected()
    every = {(s.method.__name__, i.method.__name__)
             for s in automaton.states() for i in automaton.inputAlphabet()}
    assert len(every) == 8 * 11 and set(actual) <= every
