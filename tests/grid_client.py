"""A slixmpp client driven by the grid tests: a real XMPP client in its own process.

Usage: python tests/grid_client.py JSON_OPTIONS. Events are printed as JSON lines on stdout
({"event": ...}); commands are read as JSON lines on stdin:
{"op": "send", "to": ..., "body": ..., "type": "chat"}, {"op": "ping", "to": ...},
{"op": "pings", "to": ..., "count": N} (back to back), {"op": "presence"}, {"op": "quit"}.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def main() -> None:
    options = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.ERROR if not options.get("debug") else logging.DEBUG,
                        stream=sys.stderr)
    client = slixmpp.ClientXMPP(options["jid"], options.get("password", ""))
    client.ca_certs = options["ca"]
    if options.get("cert"):
        client.certfile = options["cert"]
        client.keyfile = options["key"]
    if options.get("direct_tls"):
        client.enable_starttls = False
    else:
        client.enable_direct_tls = False
    if options.get("mechanisms"):
        client.plugin["feature_mechanisms"].use_mechs = set(options["mechanisms"])
    client.register_plugin("xep_0199")
    if options.get("sm"):
        client.register_plugin("xep_0198")
    quitting = False

    def on_session(_: object) -> None:
        emit(event="session", jid=str(client.boundjid), tls=client.socket.version()
             if hasattr(client.socket, "version") else None,
             mechanism=client.plugin["feature_mechanisms"].mech.name
             if client.plugin["feature_mechanisms"].mech else None)
        client.send_presence()

    def on_message(msg: slixmpp.Message) -> None:
        delay = msg.xml.find("{urn:xmpp:delay}delay")
        emit(event="message", frm=str(msg["from"]), body=msg["body"], type=msg["type"],
             delay=delay.get("stamp") if delay is not None else None,
             error=msg["error"]["condition"] if msg["type"] == "error" else None)

    def on_failed_auth(stanza: object) -> None:
        condition = getattr(stanza, "get", lambda *_: None)("condition")
        emit(event="failed_auth", condition=condition)

    def on_stream_error(error: object) -> None:
        emit(event="stream_error", condition=error["condition"])  # type: ignore[index]

    def on_disconnected(reason: object) -> None:
        emit(event="disconnected", reason=str(reason))
        if options.get("reconnect") and not quitting:
            client.connect(host="127.0.0.1", port=options["port"])
        elif not options.get("reconnect"):
            client.loop.call_soon(client.loop.stop)

    client.add_event_handler("session_start", on_session)
    client.add_event_handler("session_resumed", lambda _: emit(event="resumed"))
    client.add_event_handler("sm_enabled", lambda _: emit(event="sm_enabled"))
    client.add_event_handler("message", on_message)
    client.add_event_handler("failed_auth", on_failed_auth)
    client.add_event_handler("failed_all_auth", lambda _: emit(event="failed_all_auth"))
    client.add_event_handler("stream_error", on_stream_error)
    client.add_event_handler("disconnected", on_disconnected)

    async def commands() -> None:
        nonlocal quitting
        reader = asyncio.StreamReader()
        await client.loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = await reader.readline()
            if not line:
                return
            command = json.loads(line)
            op = command["op"]
            if op == "send":
                client.send_message(mto=command["to"], mbody=command["body"],
                                    mtype=command.get("type", "chat"))
                emit(event="sent", body=command["body"])
            elif op == "ping":
                try:
                    rtt = await client.plugin["xep_0199"].ping(command["to"], timeout=5)
                    emit(event="pong", rtt=rtt)
                except IqError as e:
                    emit(event="iq_error", condition=e.iq["error"]["condition"])
                except IqTimeout:
                    emit(event="iq_timeout")
            elif op == "pings":  # back to back, one pong each, then pings_done
                for _ in range(command["count"]):
                    try:
                        rtt = await client.plugin["xep_0199"].ping(command["to"], timeout=5)
                    except (IqError, IqTimeout) as e:
                        emit(event="iq_error", condition=str(e))
                        break
                    emit(event="pong", rtt=rtt)
                emit(event="pings_done")
            elif op == "quit":
                quitting = True
                client.disconnect()

    # Keep a reference to the task, or the event loop may collect it while it waits.
    tasks = [client.loop.create_task(commands())]
    client.connect(host="127.0.0.1", port=options["port"])
    client.loop.run_forever()
    tasks.clear()


if __name__ == "__main__":
    main()
