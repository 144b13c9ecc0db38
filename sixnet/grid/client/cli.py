"""``sixnet grid topics|info|create|configure|delete|publish|items|subscribe|unsubscribe|
follow|pending|approve|deny|affiliations``: the lab client of an XMPP-Grid broker.

Each command logs in to a controller (sixnet's, or any XMPP server with XEP-0060 pubsub)
through `sixnet.grid.client`, does one thing and prints the answer, for people or, with
``--json``, as one JSON document (``follow``: one JSON object per line). Logging in is by
client certificate (SASL EXTERNAL: ``--identity NAME`` of ``[pki.identities]``, or
``--certificate``/``--key``) or by password, read from the terminal, ``--password-file`` or
``--password-stdin``: never from the command line.

Exit status: 0 done; 1 the server refused the request (its XMPP error condition is
printed); 2 a bad command line or configuration; 3 the server could not be reached, TLS or
its certificate failed, or the login was refused.
"""

from __future__ import annotations

import argparse
import getpass
import json
import signal
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lxml import etree
from twisted.internet import defer
from twisted.python.failure import Failure

from sixnet.core.cli import CommandGroup, Output
from sixnet.core.config import DEFAULT_CONFIG
from sixnet.core.errors import EXIT_FAILED, EXIT_USAGE, CommandError
from sixnet.grid.client.errors import AuthenticationError, ClientError, IQError, IQTimeout
from sixnet.grid.client.pubsub import (
    Item,
    Notification,
    Page,
    PubSubClient,
    PubSubClientError,
)
from sixnet.grid.client.session import XMPPClientSession, connect
from sixnet.grid.client.stream import MAX_ELEMENT_BYTES
from sixnet.grid.jid import JIDError, parse_jid
from sixnet.pki.identity import user_ids_in
from sixnet.pki.keys import KeyFileError
from sixnet.pki.store import CertificateStore, NodeIdentity

#: Exit status when the server cannot be reached or the login is refused.
EXIT_UNREACHABLE = 3
STARTTLS_PORT, DIRECT_TLS_PORT = 5222, 5223
#: What an XML file to publish is parsed with: no DTD, no entities, nothing fetched.
SAFE_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                              huge_tree=False, remove_comments=True, remove_pis=True)
#: What a command does once logged in.
Work = Callable[[PubSubClient, Output], Coroutine[Any, Any, None]]


def register(grid: CommandGroup) -> None:
    """Add the lab commands to the ``sixnet grid`` group."""
    p = _command(grid, "topics", _topics, "list the service's topics, one page at a time")
    _paging(p)
    p = _command(grid, "info", _info, "a topic's metadata (pubsub#type, access model...)")
    _topic(p)
    p = _command(grid, "create", _create, "create a topic (you become its owner)")
    _topic(p)
    p.add_argument("--access-model", help="authorize, whitelist or open (default: the "
                                          "service's)")
    _options(p)
    p = _command(grid, "configure", _configure, "change a topic's configuration "
                                                   "(owners); without --option, print it")
    _topic(p)
    _options(p)
    p = _command(grid, "delete", _delete, "delete a topic and its items (owners)")
    _topic(p)
    p = _command(grid, "publish", _publish, "publish one XML document (IODEF or any) "
                                               "to a topic")
    _topic(p)
    p.add_argument("file", metavar="FILE", help="the XML document, '-' for standard input")
    p.add_argument("--id", dest="item_id", help="the item id (default: the service's)")
    p = _command(grid, "items", _items, "a topic's stored items, one page at a time")
    _topic(p)
    _paging(p)
    p = _command(grid, "subscribe", _subscribe, "subscribe to a topic (pending until an "
                                                   "owner approves, on authorize topics)")
    _topic(p)
    p = _command(grid, "unsubscribe", _unsubscribe, "end your subscription to a topic")
    _topic(p)
    p = _command(grid, "follow", _follow, "print each notification of the topics (all, when "
                                             "none is named) as it arrives, those stored "
                                             "while offline first")
    p.add_argument("topics", nargs="*", metavar="TOPIC")
    p.add_argument("--count", type=int, default=0,
                   help="stop after this many notifications (default: run until Ctrl-C)")
    p = _command(grid, "pending", _pending, "subscription requests waiting for approval "
                                               "(owners)")
    _topic(p)
    for name, allow in (("approve", True), ("deny", False)):
        p = _command(grid, name, _decide(allow), f"{name} a pending subscription request "
                                                 "(owners)")
        _topic(p)
        p.add_argument("subscriber", metavar="JID", help="the subscriber (bare JID: all its "
                                                         "requests)")
    p = _command(grid, "affiliations", _affiliations, "a topic's affiliations (owners)")
    _topic(p)


def _command(grid: CommandGroup, name: str, factory: Callable[[argparse.Namespace], Work],
             help_text: str) -> argparse.ArgumentParser:
    """A lab command: `factory(args)` checks the arguments and returns the work to do once
    logged in (``args.work``, which the in-process tests hand to `execute`)."""
    p = grid.command(name, _runner(factory), help_text)
    p.set_defaults(work=factory)
    login = p.add_argument_group("connection and login")
    login.add_argument("--server", metavar="HOST[:PORT]",
                       help="the XMPP server (default: localhost, the port of [grid] listen "
                            f"or listen_tls, else {STARTTLS_PORT}/{DIRECT_TLS_PORT})")
    login.add_argument("--direct-tls", action="store_true",
                       help="TLS from the first byte (XEP-0368) instead of STARTTLS")
    login.add_argument("--server-name", help="the name the server's certificate must carry "
                                             "(default: the JID's domain)")
    login.add_argument("--jid", help="who to log in as (default: the subject of --identity "
                                     "or of --certificate)")
    login.add_argument("--service", help="the pubsub service's JID (default: "
                                         "[grid.broker] subdomain.DOMAIN, broker.DOMAIN)")
    login.add_argument("--identity", metavar="NAME",
                       help="log in with the certificate of [pki.identities.NAME] (EXTERNAL)")
    login.add_argument("--certificate", type=Path, help="client certificate file (PEM)")
    login.add_argument("--key", type=Path, help="its private key (PEM)")
    login.add_argument("--password-file", type=Path,
                       help="read the password from the first line of this file")
    login.add_argument("--password-stdin", action="store_true",
                       help="read the password from the first line of standard input")
    login.add_argument("--mechanism", action="append", dest="mechanisms", metavar="NAME",
                       help="allow only this SASL mechanism (repeatable)")
    login.add_argument("--ca", action="append", type=Path, metavar="FILE",
                       help="trust anchors to check the server with (default: [pki] "
                            "trust_anchors; with --ca no configuration file is needed)")
    login.add_argument("--timeout", type=float, default=20.0,
                       help="seconds to connect and for each answer (default 20)")
    return p


def _topic(p: argparse.ArgumentParser) -> None:
    p.add_argument("topic", metavar="TOPIC")


def _paging(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max", type=int, help="at most this many per page")
    p.add_argument("--after", help="the page after this key (the 'last' of a page)")
    p.add_argument("--before", help="the page before this key ('' for the last page)")


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a pubsub#... configuration option (repeatable; the pubsub# prefix "
                        "may be left out)")


# -- login settings ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Login:
    """Everything a command needs to log in, read before the reactor runs."""

    host: str
    port: int
    jid: str
    service: str
    store: CertificateStore
    direct_tls: bool
    server_name: str | None
    password: str | None
    identity: NodeIdentity | None
    mechanisms: list[str] | None
    timeout: float


def _config(args: argparse.Namespace) -> Any:
    """The configuration file, or None when --ca stands in for it and there is none."""
    if args.ca and args.config is None and not DEFAULT_CONFIG.exists():
        return None
    return args.load_config(args.config or DEFAULT_CONFIG, check_files=False)


def _server(text: str | None, config: Any, direct_tls: bool) -> tuple[str, int]:
    default = DIRECT_TLS_PORT if direct_tls else STARTTLS_PORT
    if config is not None:
        endpoints = config.grid.listen_tls if direct_tls else config.grid.listen
        for endpoint in endpoints:
            parts = endpoint.split(":")
            if parts[0] in ("tcp", "tcp6", "ssl") and len(parts) > 1 and parts[1].isdigit() \
                    and int(parts[1]) > 0:
                default = int(parts[1])
                break
    if not text:
        return "localhost", default
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") or str(default)
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, str(default)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CommandError(f"--server {text!r}: not HOST[:PORT]", EXIT_USAGE)
    return host, int(port)


def _read_first_line(path: Path, what: str) -> str:
    try:
        with path.open(encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    except OSError as e:
        raise CommandError(f"{path}: cannot read the {what} ({e.strerror})", EXIT_USAGE) \
            from None
    except UnicodeDecodeError:
        raise CommandError(f"{path}: the {what} is not UTF-8", EXIT_USAGE) from None


def _password(args: argparse.Namespace, jid: str) -> str:
    if args.password_file is not None:
        password = _read_first_line(args.password_file, "password")
    elif args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass(f"password for {jid}: ")
    else:
        raise CommandError("no password: give --password-file FILE or --password-stdin (or "
                           "log in with a certificate: --identity, --certificate/--key)",
                           EXIT_USAGE)
    if not password:
        raise CommandError("the password is empty", EXIT_USAGE)
    return password


def _identity(args: argparse.Namespace, config: Any) -> tuple[NodeIdentity | None, str | None]:
    """The client certificate to log in with, and the JID it names."""
    if args.identity and (args.certificate or args.key):
        raise CommandError("--identity and --certificate/--key exclude each other", EXIT_USAGE)
    if args.identity:
        if config is None or args.identity not in config.pki.identities:
            raise CommandError(f"--identity {args.identity}: no [pki.identities."
                               f"{args.identity}] in the configuration", EXIT_USAGE)
        table = config.pki.identities[args.identity]
        where = f"{config.path}: pki.identities.{args.identity}"
        certificate, key, subject = table.certificate, table.key, table.subject
    elif args.certificate or args.key:
        if not (args.certificate and args.key):
            raise CommandError("--certificate and --key go together", EXIT_USAGE)
        where, certificate, key, subject = str(args.certificate), args.certificate, args.key, None
    else:
        return None, None
    try:
        identity = NodeIdentity.load(args.identity or "client", certificate, key)
    except (KeyFileError, OSError, ValueError) as e:
        raise CommandError(f"{where}: {e}", EXIT_USAGE) from None
    if subject is None:
        names = user_ids_in(identity.certificate)
        subject = next(iter(names)) if len(names) == 1 else None
    return identity, subject


def _store(args: argparse.Namespace, config: Any) -> CertificateStore:
    anchors = args.ca or (config.pki.trust_anchors if config is not None else [])
    crls = config.pki.crls if config is not None and not args.ca else []
    if not anchors:
        raise CommandError("no trust anchors: give --ca FILE or a configuration with [pki] "
                           "trust_anchors", EXIT_USAGE)
    try:
        return CertificateStore.from_files(anchors, crls)
    except (KeyFileError, OSError, ValueError) as e:
        raise CommandError(f"trust anchors: {e}", EXIT_USAGE) from None


def login_of(args: argparse.Namespace) -> Login:
    """Read the configuration, certificate and password a command logs in with."""
    if args.timeout <= 0:
        raise CommandError("--timeout must be positive", EXIT_USAGE)
    config = _config(args)
    identity, subject = _identity(args, config)
    jid = args.jid or subject
    if not jid:
        raise CommandError("--jid is missing (who to log in as, user@domain)", EXIT_USAGE)
    try:
        parsed = parse_jid(jid)
    except JIDError as e:
        raise CommandError(f"--jid {jid!r}: {e}", EXIT_USAGE) from None
    if parsed.local is None:
        raise CommandError(f"--jid {jid!r}: needs a user part (user@domain)", EXIT_USAGE)
    host, port = _server(args.server, config, args.direct_tls)
    subdomain = config.grid.broker.subdomain if config is not None else "broker"
    password = None if identity is not None else _password(args, str(parsed.bare))
    return Login(host, port, jid, args.service or f"{subdomain}.{parsed.domain}",
                 _store(args, config), args.direct_tls, args.server_name, password, identity,
                 args.mechanisms, args.timeout)


# -- running a command -------------------------------------------------------------------------


async def open_session(login: Login) -> XMPPClientSession:
    from twisted.internet import reactor

    try:
        return await connect(reactor, login.host, login.port, login.jid,
                             password=login.password, identity=login.identity,
                             store=login.store, direct_tls=login.direct_tls,
                             mechanisms=login.mechanisms, server_name=login.server_name,
                             timeout=login.timeout,
                             iq_timeout=login.timeout)
    except AuthenticationError as e:
        raise CommandError(f"login as {login.jid} refused: {e}", EXIT_UNREACHABLE) from None
    except ClientError as e:
        raise CommandError(f"cannot connect to {login.host}:{login.port}: {e}",
                           EXIT_UNREACHABLE) from None


async def execute(args: argparse.Namespace, out: Output, work: Work) -> int:
    """Log in, run `work` with a pubsub client, close; server errors become CommandErrors.

    Needs a running reactor (the in-process tests call this directly)."""
    login = args.login if getattr(args, "login", None) else login_of(args)
    session = await open_session(login)
    try:
        await work(PubSubClient(session, login.service), out)
    except IQError as e:
        raise CommandError(f"the server refused: {e}", EXIT_FAILED) from None
    except PubSubClientError as e:
        raise CommandError(str(e.text), EXIT_FAILED) from None
    except (IQTimeout, ClientError) as e:
        raise CommandError(f"the session with {login.host}:{login.port} failed: {e}",
                           EXIT_UNREACHABLE) from None
    finally:
        await session.close()
    return 0


def run_with_reactor(args: argparse.Namespace, out: Output, work: Work) -> int:
    """Run one command on the reactor; Ctrl-C ends it cleanly (follow's only way out)."""
    from twisted.internet import reactor

    args.login = login_of(args)  # prompts and file errors before the reactor starts
    outcome: list[Any] = []
    running: list[defer.Deferred[int]] = []

    def start() -> None:
        d = defer.Deferred.fromCoroutine(execute(args, out, work))
        running.append(d)
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.callLater(0, reactor.stop))  # type: ignore[attr-defined]

    def interrupted(signum: int, frame: Any) -> None:
        if running:
            reactor.callFromThread(running[0].cancel)  # type: ignore[attr-defined]

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        reactor.callWhenRunning(start)  # type: ignore[attr-defined]
        reactor.run(installSignalHandlers=False)  # type: ignore[attr-defined]
    finally:
        signal.signal(signal.SIGINT, previous)
    result = outcome[0]
    if isinstance(result, Failure):
        if result.check(defer.CancelledError):
            return 0
        result.raiseException()
    return int(result)


def _runner(factory: Callable[[argparse.Namespace], Work]
            ) -> Callable[[argparse.Namespace, Output], int]:
    def run(args: argparse.Namespace, out: Output) -> int:
        return run_with_reactor(args, out, factory(args))

    return run


# -- printing ----------------------------------------------------------------------------------


def xml_text(element: etree._Element | None) -> str | None:
    return None if element is None else etree.tostring(element, encoding="unicode")


def page_json(page: Page) -> dict[str, Any]:
    return {"first": page.first, "last": page.last, "count": page.count, "index": page.index}


def page_text(page: Page, shown: int) -> str:
    if page.count is None:
        return f"({shown} shown; the service does not page)"
    more = ""
    if page.last and (page.index or 0) + shown < page.count:
        more = f"; next page: --after {page.last}"
    return f"({shown} of {page.count}{more})"


def notification_json(n: Notification) -> dict[str, Any]:
    return {"node": n.node, "id": n.item_id, "delay": n.delay, "from": n.sender,
            "payload": xml_text(n.payload)}


def notification_xml(n: Notification) -> str:
    """One notification as one XML element: the event item, with node and delay stamp."""
    item = etree.Element("{http://jabber.org/protocol/pubsub#event}item",
                         nsmap={None: "http://jabber.org/protocol/pubsub#event"})
    item.set("node", n.node)
    if n.item_id is not None:
        item.set("id", n.item_id)
    if n.delay is not None:
        item.set("delay", n.delay)
    if n.payload is not None:
        item.append(etree.fromstring(etree.tostring(n.payload)))
    return etree.tostring(item, encoding="unicode")


def _item_json(item: Item) -> dict[str, Any]:
    return {"id": item.id, "payload": xml_text(item.payload)}


def option_pairs(texts: list[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise CommandError(f"--option {text!r}: not KEY=VALUE", EXIT_USAGE)
        options[key if key.startswith("pubsub#") else f"pubsub#{key}"] = value
    return options


def read_document(name: str) -> etree._Element:
    """The one XML element in FILE (or standard input), parsed without DTDs or entities."""
    if name == "-":
        stream = getattr(sys.stdin, "buffer", None)
        data = stream.read(MAX_ELEMENT_BYTES + 1) if stream is not None else \
            sys.stdin.read(MAX_ELEMENT_BYTES + 1).encode()
        where = "standard input"
    else:
        where = name
        try:
            with open(name, "rb") as f:
                data = f.read(MAX_ELEMENT_BYTES + 1)
        except OSError as e:
            raise CommandError(f"{name}: cannot read it ({e.strerror})", EXIT_USAGE) from None
    if len(data) > MAX_ELEMENT_BYTES:
        raise CommandError(f"{where}: larger than {MAX_ELEMENT_BYTES} bytes", EXIT_USAGE)
    try:
        tree = etree.ElementTree(etree.fromstring(data, SAFE_PARSER))
    except etree.XMLSyntaxError as e:
        raise CommandError(f"{where}: not one XML element ({e.msg})", EXIT_USAGE) from None
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:
        raise CommandError(f"{where}: a DOCTYPE is not accepted", EXIT_USAGE)
    root = tree.getroot()
    if any(isinstance(node, etree._Entity) for node in root.iter()):
        raise CommandError(f"{where}: entity references are not accepted", EXIT_USAGE)
    return root


# -- the commands --------------------------------------------------------------------------


def _topics(args: argparse.Namespace) -> Work:
    async def work(pubsub: PubSubClient, out: Output) -> None:
        result = await pubsub.topics(max=args.max, after=args.after, before=args.before)
        out.result({"topics": [{"node": t.node, "name": t.name} for t in result.topics],
                    **page_json(result.page)},
                   lambda: "\n".join([*(f"{t.node}" + (f"  ({t.name})" if t.name else "")
                                        for t in result.topics),
                                      page_text(result.page, len(result.topics))]))
    return work


def _info(args: argparse.Namespace) -> Work:
    async def work(pubsub: PubSubClient, out: Output) -> None:
        info = await pubsub.info(args.topic)
        data = {"node": info.node, "type": info.type, "title": info.value("pubsub#title"),
                "access_model": info.value("pubsub#access_model"),
                "owners": info.meta.get("pubsub#owner", []),
                "creation_date": info.value("pubsub#creation_date"),
                "identities": [{"category": c, "type": t} for c, t in info.identities],
                "features": info.features,
                "meta": {k: v for k, v in info.meta.items() if k != "FORM_TYPE"}}
        out.result(data, lambda: "\n".join(
            [f"{info.node}"] + [f"  {k}: {', '.join(v)}" for k, v in data["meta"].items()]
            + [f"  identity: {c}/{t}" for c, t in info.identities]))
    return work


def _create(args: argparse.Namespace) -> Work:
    options = option_pairs(args.option)

    async def work(pubsub: PubSubClient, out: Output) -> None:
        node = await pubsub.create(args.topic, access_model=args.access_model,
                                   options=options)
        out.result({"created": node}, f"topic {node} created")
    return work


def _configure(args: argparse.Namespace) -> Work:
    options = option_pairs(args.option)

    async def work(pubsub: PubSubClient, out: Output) -> None:
        if options:
            values = await pubsub.configure(args.topic, options)
        else:
            values = await pubsub.configuration(args.topic)
        shown = {k: v for k, v in values.items() if k != "FORM_TYPE"}
        out.result({"node": args.topic, "options": shown},
                   lambda: "\n".join(f"{k} = {', '.join(v)}" for k, v in shown.items()))
    return work


def _delete(args: argparse.Namespace) -> Work:
    async def work(pubsub: PubSubClient, out: Output) -> None:
        await pubsub.delete(args.topic)
        out.result({"deleted": args.topic}, f"topic {args.topic} deleted")
    return work


def _publish(args: argparse.Namespace) -> Work:
    if args.file == "-" and args.password_stdin:
        raise CommandError("the password and the document cannot both come from standard "
                           "input (use --password-file)", EXIT_USAGE)
    document = read_document(args.file)

    async def work(pubsub: PubSubClient, out: Output) -> None:
        item_id = await pubsub.publish(args.topic, document, args.item_id)
        out.result({"node": args.topic, "id": item_id},
                   f"published to {args.topic} as item {item_id}")
    return work


def _items(args: argparse.Namespace) -> Work:
    async def work(pubsub: PubSubClient, out: Output) -> None:
        result = await pubsub.items(args.topic, max=args.max, after=args.after,
                                    before=args.before)
        out.result({"node": args.topic, "items": [_item_json(i) for i in result.items],
                    **page_json(result.page)},
                   lambda: "\n".join([*(f"{i.id}: {xml_text(i.payload)}" for i in result.items),
                                      page_text(result.page, len(result.items))]))
    return work


def _subscribe(args: argparse.Namespace) -> Work:
    async def work(pubsub: PubSubClient, out: Output) -> None:
        sub = await pubsub.subscribe(args.topic)
        out.result({"node": sub.node, "jid": sub.jid, "subscription": sub.state,
                    "subid": sub.subid},
                   f"{sub.jid} subscribed to {sub.node}" if sub.state == "subscribed" else
                   f"{sub.jid}: subscription to {sub.node} is {sub.state}"
                   + (" (an owner must approve it)" if sub.state == "pending" else ""))
    return work


def _unsubscribe(args: argparse.Namespace) -> Work:
    async def work(pubsub: PubSubClient, out: Output) -> None:
        await pubsub.unsubscribe(args.topic)
        out.result({"unsubscribed": args.topic}, f"unsubscribed from {args.topic}")
    return work


def _follow(args: argparse.Namespace) -> Work:
    if args.count < 0:
        raise CommandError("--count must be 0 or more", EXIT_USAGE)
    wanted = set(args.topics)

    async def work(pubsub: PubSubClient, out: Output) -> None:
        session = pubsub.session
        done: defer.Deferred[None] = defer.Deferred()
        printed = 0

        def on_message(message: etree._Element) -> None:
            nonlocal printed
            for n in Notification.parse(message):
                if done.called or (wanted and n.node not in wanted):
                    # The server hands over an account's whole offline store at once: say
                    # what was taken and not shown, so it can be fetched with `items`.
                    print(f"sixnet: not shown: item {n.item_id} of topic {n.node}",
                          file=sys.stderr)
                    continue
                print(json.dumps(notification_json(n), sort_keys=True) if out.as_json
                      else notification_xml(n), flush=True)
                printed += 1
                if args.count and printed >= args.count:
                    done.callback(None)

        session.add_message_handler(on_message)
        session.closed.addCallback(lambda error: None if done.called else done.errback(
            error or ClientError("the server ended the session", "closed")))
        session.send(etree.Element("{jabber:client}presence",
                                   nsmap={None: "jabber:client"}))
        await done
    return work


def _pending(args: argparse.Namespace) -> Work:
    async def work(pubsub: PubSubClient, out: Output) -> None:
        requests = await pubsub.pending(args.topic)
        out.result({"node": args.topic,
                    "pending": [{"jid": s.jid, "subid": s.subid} for s in requests]},
                   lambda: "\n".join(s.jid for s in requests)
                   or f"no pending requests for {args.topic}")
    return work


def _decide(allow: bool) -> Callable[[argparse.Namespace], Work]:
    def command(args: argparse.Namespace) -> Work:
        async def work(pubsub: PubSubClient, out: Output) -> None:
            decide = pubsub.approve if allow else pubsub.deny
            decided = await decide(args.topic, args.subscriber)
            verb = "approved" if allow else "denied"
            out.result({"node": args.topic, verb: [s.jid for s in decided]},
                       f"{verb}: {', '.join(s.jid for s in decided)}")
        return work
    return command


def _affiliations(args: argparse.Namespace) -> Work:
    async def work(pubsub: PubSubClient, out: Output) -> None:
        pairs = await pubsub.affiliations(args.topic)
        out.result({"node": args.topic,
                    "affiliations": [{"jid": j, "affiliation": a} for j, a in pairs]},
                   lambda: "\n".join(f"{j:<40} {a}" for j, a in pairs) or "no affiliations")
    return work
