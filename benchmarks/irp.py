"""IRP registry throughput and latency, against OpenLDAP slapd serving the same records.

Both servers hold N persons (default 100,000), each with one registered IPv6 address and a
real certificate from a lab CA, and are driven by the same raw asyncio load generator in
this process (no IRP or LDAP library in the measured path; responses are framed, not
verified): C clients (default 50) on persistent TLS connections, each authenticated (IRP: its
client certificate; LDAP: a simple bind as its own entry over LDAPS), each with one request
in flight (closed loop).

* first lookups: every person looked up once, shared out among the clients: each record
  is shown for the first time (sixnet signs it then, and keeps the signature in its
  database for every worker; slapd reads its pages for the first time);
* lookups: each client looks up random persons for ``--seconds`` (with ``--hot N``: random
  persons among the first N only, a working set such as people's contacts), every record
  having been shown once (a registry in service, not one just filled);
* registrations: each client re-registers its own address (IRP ``<register>``; LDAP: a
  modify replacing ``labeledURI`` on its own entry) for ``--seconds``.

Every server runs from the start; lookups and then registrations are measured in
``--rounds`` rounds (default 3) in which the servers take turns, the same requests for each
in a round, so a slower minute of a shared machine falls on all of them alike. A phase's
figures are those of its round of median rate (``rounds_per_second`` lists every round);
the ratios are of those medians, and ``*_rounds_sixnet_over_slapd`` gives them per round.

Reported per server and phase: operations/s, p50/p99 latency; for IRP also the registry's
resident memory (RSS) with the N persons loaded and its database size, both per person.
sixnet runs as ``twistd -n sixnet-irp`` (SQLite, WAL, synchronous=FULL) with ``--workers``
worker processes (``[irp] workers``; default: one per CPU the load generator leaves, as it
runs on the same machine: one on two cores); slapd (Debian package ``slapd``)
runs with back-mdb, its default threads and the same TLS certificate, both on loopback.
If slapd is not installed, it is skipped.

In each round of lookups, they are also run against ``benchmarks/tls_floor.py``: a Twisted
server with the registry's TLS settings that answers each request with a recorded lookup
answer of the registry and does nothing else. Its rate is the most any registry on Twisted
and pyOpenSSL can reach with this load generator on this machine; ``server_cpu_us_per_op``
of each server is its CPU time per operation, and sixnet's minus the floor's is what the
registry itself costs per request.

Usage: python benchmarks/irp.py [--persons 100000] [--clients 50] [--seconds 10] [--hot N]
                                [--rounds 3] [--workers N]
Prints one JSON document on standard output (progress on standard error).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import json
import os
import random
import shutil
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from lxml import etree

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sixnet.core.storage.database import SQLiteEngine
from sixnet.core.stream.parser import StreamParser
from sixnet.irp.storage import MIGRATIONS
from sixnet.pki.ca import LabCA
from sixnet.pki.identity import user_san
from sixnet.pki.keys import certificates_pem, generate_key
from sixnet.pki.signing import certificate_hash
from tests.support.configs import config_file, sixnet_toml
from tests.support.pki import IdentityFiles
from tests.support.ports import free_port, wait_for_port
from tests.support.procfs import cpu_seconds, rss_kib
from tests.support.twistd import twistd_command

HOST = "localhost"
NS = "urn:sixnet:irp:1"
#: A 1.2 client: lookups are answered with the person's record signed once per version.
HEADER = f'<irp xmlns="{NS}" version="1.2" to="{HOST}">'.encode()


def process_tree(pid: int) -> list[int]:
    """`pid` and its children (the registry's workers)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [pid, *(int(p) for p in f.read().split())]
    except OSError:
        return [pid]


def tree_cpu(pid: int) -> float:
    return sum(cpu_seconds(p) for p in process_tree(pid))


def tree_rss(pid: int) -> int:
    return sum(rss_kib(p) for p in process_tree(pid))


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- the records ------------------------------------------------------------------------------


def person_id(i: int) -> str:
    return f"person{i:06d}@example.test"


def person_address(i: int) -> str:
    return f"2001:db8::{i // 65536:x}:{i % 65536:x}"


def make_population(ca: LabCA, count: int) -> list[bytes]:
    """One real certificate per person (DER), made directly with the CA key (fast path)."""
    key = generate_key().public_key()  # one key for all: only the certificates matter here
    now = datetime.datetime.now(datetime.UTC)
    issuer = ca.certificate.subject
    algorithm = certificate_hash(ca.key)
    out = []
    for i in range(count):
        user = person_id(i)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, user)]))
                .issuer_name(issuer).public_key(key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .add_extension(user_san(user), critical=False)
                .sign(ca.key, algorithm))
        out.append(cert.public_bytes(serialization.Encoding.DER))
    return out


def fill_registry_database(path: Path, certs: list[bytes]) -> None:
    now = int(time.time() * 1000)
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE schema_version (component TEXT PRIMARY KEY, version INTEGER "
               "NOT NULL)")
    for statement in MIGRATIONS[1]:
        db.execute(statement.format(**SQLiteEngine.types))
    db.execute("INSERT INTO schema_version VALUES ('irp', 1)")
    people = [(person_id(i), now) for i in range(len(certs))]
    db.executemany("INSERT INTO irp_person VALUES (?, ?)", people)
    db.executemany(
        "INSERT INTO irp_certificate (serial, person, issued, not_after, chain, revoked)"
        " VALUES (?, ?, ?, ?, ?, NULL)",
        [(format(x509.load_der_x509_certificate(der).serial_number, "X"), person_id(i), now,
          now + 30 * 86_400_000,
          certificates_pem([x509.load_der_x509_certificate(der)])) for i, der in
         enumerate(certs)])
    db.executemany(
        "INSERT INTO irp_device (person, device, registered, expires, addresses)"
        " VALUES (?, 'default', ?, ?, ?)",
        [(person_id(i), now + i, now + 86_400_000, json.dumps([[person_address(i), 4605]]))
         for i in range(len(certs))])
    db.commit()
    db.close()


# -- load generation --------------------------------------------------------------------------


class Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0

    def summary(self, elapsed: float) -> dict[str, float | int]:
        lat = sorted(self.latencies)
        if not lat:
            return {"operations": 0, "errors": self.errors}
        return {
            "operations": len(lat),
            "errors": self.errors,
            "per_second": round(len(lat) / elapsed, 1),
            "p50_ms": round(lat[len(lat) // 2] * 1000, 3),
            "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 3),
            "mean_ms": round(statistics.fmean(lat) * 1000, 3),
        }

    def with_cpu(self, elapsed: float, server_cpu_s: float) -> dict[str, float | int]:
        """The summary with the server's CPU time per operation (us)."""
        summary = self.summary(elapsed)
        if self.latencies:
            summary["server_cpu_us_per_op"] = round(server_cpu_s * 1e6 / len(self.latencies), 1)
        return summary


async def run_clients(sessions: list, operation, seconds: float,
                      server_cpu: Callable[[], float], seed: int = 0) -> dict:
    """Closed loop for `seconds`; with the server's CPU time per operation (us). Client i
    draws from ``Random((seed, i))``: each server gets the same requests in a round."""
    stats = Stats()
    cpu_before = server_cpu()
    deadline = time.monotonic() + seconds
    started = time.monotonic()

    async def loop(index: int, session) -> None:
        rng = random.Random(f"{seed}/{index}")
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            ok = await operation(session, rng)
            if ok:
                stats.latencies.append(time.perf_counter() - t0)
            else:
                stats.errors += 1

    await asyncio.gather(*(loop(i, s) for i, s in enumerate(sessions)))
    return stats.with_cpu(time.monotonic() - started, server_cpu() - cpu_before)


async def run_once_each(sessions: list, operation, count: int,
                        server_cpu: Callable[[], float]) -> dict:
    """Each of `count` persons once, shared out among the sessions (closed loop): the
    first lookups, after which every record has been shown once."""
    stats = Stats()
    cpu_before = server_cpu()
    started = time.monotonic()

    async def loop(index: int, session) -> None:
        for person in range(index, count, len(sessions)):
            t0 = time.perf_counter()
            if await operation(session, person):
                stats.latencies.append(time.perf_counter() - t0)
            else:
                stats.errors += 1

    await asyncio.gather(*(loop(i, s) for i, s in enumerate(sessions)))
    return stats.with_cpu(time.monotonic() - started, server_cpu() - cpu_before)


class Target:
    """One server under test: its sessions and operations, and its results by phase."""

    def __init__(self, name: str, sessions: list, lookup, register,
                 cpu: Callable[[], float]) -> None:
        self.name, self.sessions, self.cpu = name, sessions, cpu
        self.lookup, self.register = lookup, register
        self.rounds: dict[str, list[dict]] = {"lookups": [], "registrations": []}
        self.result: dict = {}

    async def first_lookups(self, persons: int) -> None:
        progress(f"{self.name}: first lookups")
        self.result["first_lookups"] = await run_once_each(self.sessions, self.lookup,
                                                           persons, self.cpu)

    async def run_round(self, phase: str, persons: int, seconds: float, seed: int) -> None:
        if phase == "lookups":
            def operation(session, rng):
                return self.lookup(session, rng.randrange(persons))
        else:
            operation = self.register
        self.rounds[phase].append(await run_clients(self.sessions, operation, seconds,
                                                    self.cpu, seed))

    def summary(self) -> dict:
        """Per phase, the round of median rate, with every round's rate."""
        for phase, rounds in self.rounds.items():
            if rounds:
                ranked = sorted(rounds, key=lambda r: r.get("per_second", 0))
                self.result[phase] = {**ranked[len(ranked) // 2],
                                      "rounds_per_second": [r.get("per_second", 0)
                                                            for r in rounds]}
        return self.result

    def close(self) -> None:
        for session in self.sessions:
            session.writer.close()


class IRPSession:
    """A raw IRP client: header, STARTTLS, client certificate, then one request at a time."""

    def __init__(self, reader, writer) -> None:
        self.reader, self.writer = reader, writer
        self.parser = StreamParser(max_element_bytes=1 << 20)
        self.queue: list = []
        self.buffer = b""
        self.last_answer = b""
        self.next_id = 0

    async def element(self):
        while not self.queue:
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("closed")
            self.queue.extend(e for e in self.parser.feed(data)
                              if isinstance(e, etree._Element))
        return self.queue.pop(0)

    @classmethod
    async def open(cls, port: int, context: ssl.SSLContext) -> IRPSession:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        session = cls(reader, writer)
        writer.write(HEADER)
        await session.expect("features")
        writer.write(b"<starttls/>")
        await session.expect("proceed")
        session.parser.reset()
        session.queue.clear()
        await writer.start_tls(context, server_hostname=HOST)
        writer.write(HEADER)
        session_element = await session.expect("session")
        if session_element.get("user") is None:
            raise RuntimeError(f"not authenticated: {session_element.get('refused')}")
        return session

    async def expect(self, name: str):
        while True:
            node = await self.element()
            if isinstance(node.tag, str) and node.tag.endswith("}" + name):
                return node

    async def call(self, body: str) -> bool:
        """One request, its answer framed by its end tag (as the LDAP client frames BER):
        with one request in flight, the next ``</result>`` or ``</error>`` closes it."""
        self.next_id += 1
        rid = str(self.next_id)
        self.writer.write(body.replace("ID", rid, 1).encode())
        while True:
            for end in (b"</result>", b"</error>"):
                at = self.buffer.find(end)
                if at >= 0:
                    answer, self.buffer = self.buffer[:at], self.buffer[at + len(end):]
                    self.last_answer = (answer + end).replace(f' id="{rid}"'.encode(),
                                                              b' id="@ID@"', 1)
                    return end == b"</result>" and f' id="{rid}"'.encode() in answer[:200]
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("closed")
            self.buffer += data


def irp_lookup(session: IRPSession, person: int) -> Awaitable[bool]:
    return session.call(f'<lookup id="ID" user="{person_id(person)}"/>')


def irp_register(session: IRPSession, rng: random.Random) -> Awaitable[bool]:
    return session.call(
        f'<register id="ID" device="bench" lifetime="3600"><address '
        f'ip="{person_address(rng.randrange(1 << 30))}" port="4605"/></register>')


# -- LDAP (raw BER over TLS) ------------------------------------------------------------------


def ber(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def ber_int(value: int, tag: int = 0x02) -> bytes:
    return ber(tag, value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True))


def ber_str(value: str | bytes, tag: int = 0x04) -> bytes:
    return ber(tag, value.encode() if isinstance(value, str) else value)


def ldap_message(mid: int, op: bytes) -> bytes:
    return ber(0x30, ber_int(mid) + op)


class LDAPSession:
    def __init__(self, reader, writer) -> None:
        self.reader, self.writer = reader, writer
        self.buffer = b""
        self.mid = 0
        self.own = 0  # the person whose entry it is bound as

    async def message(self) -> tuple[int, int, bytes]:
        """One LDAPMessage: (message id, protocolOp tag, op content)."""
        while True:
            if len(self.buffer) >= 2:
                first = self.buffer[1]
                if first < 0x80:
                    head, length = 2, first
                else:
                    count = first & 0x7F
                    head = 2 + count
                    length = int.from_bytes(self.buffer[2:head], "big") if \
                        len(self.buffer) >= head else -1
                if length >= 0 and len(self.buffer) >= head + length:
                    body = self.buffer[head:head + length]
                    self.buffer = self.buffer[head + length:]
                    # messageID INTEGER then the op TLV
                    id_len = body[1]
                    mid = int.from_bytes(body[2:2 + id_len], "big")
                    return mid, body[2 + id_len], body[2 + id_len:]
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("closed")
            self.buffer += data

    async def request(self, op: bytes, done_tag: int) -> bool:
        self.mid += 1
        self.writer.write(ldap_message(self.mid, op))
        while True:
            mid, tag, content = await self.message()
            if tag == done_tag:
                # resultCode ENUMERATED is the first element of the LDAPResult
                inner = content[2:] if content[1] < 0x80 else content[2 + (content[1] & 0x7F):]
                return mid == self.mid and inner[:3] == b"\x0a\x01\x00"

    @classmethod
    async def open(cls, port: int, context: ssl.SSLContext, dn: str,
                   password: str) -> LDAPSession:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                       server_hostname=HOST)
        session = cls(reader, writer)
        bind = ber(0x60, ber_int(3) + ber_str(dn) + ber_str(password, 0x80))
        if not await session.request(bind, 0x61):
            raise RuntimeError(f"LDAP bind as {dn} failed")
        return session


def ldap_dn(i: int) -> str:
    return f"uid=person{i:06d},ou=people,dc=example,dc=test"


async def ldap_sessions(port: int, context: ssl.SSLContext,
                        own: list[int]) -> list[LDAPSession]:
    """One session per client, each bound as its own entry (`LDAPSession.own`)."""
    sessions = []
    for i in own:
        session = await LDAPSession.open(port, context, ldap_dn(i), f"pw{i}")
        session.own = i
        sessions.append(session)
    return sessions


def ldap_lookup(session: LDAPSession, person: int) -> Awaitable[bool]:
    search = ber(0x63, ber_str(ldap_dn(person)) + ber_int(0, 0x0A)
                 + ber_int(0, 0x0A) + ber_int(0) + ber_int(0) + ber(0x01, b"\x00")
                 + ber_str("objectClass", 0x87) + ber(0x30, b""))
    return session.request(search, 0x65)


def ldap_register(session: LDAPSession, rng: random.Random) -> Awaitable[bool]:
    value = f"irp [{person_address(rng.randrange(1 << 30))}]:4605 bench"
    change = ber(0x30, ber_int(2, 0x0A) + ber(0x30, ber_str("labeledURI")
                                              + ber(0x31, ber_str(value))))
    modify = ber(0x66, ber_str(ldap_dn(session.own)) + ber(0x30, change))
    return session.request(modify, 0x67)


def write_ldif(path: Path, certs: list[bytes], clients: list[int]) -> None:
    passwords = set(clients)
    with path.open("w") as out:
        out.write("dn: dc=example,dc=test\nobjectClass: dcObject\nobjectClass: organization\n"
                  "o: example\ndc: example\n\n"
                  "dn: ou=people,dc=example,dc=test\nobjectClass: organizationalUnit\n"
                  "ou: people\n\n")
        for i, der in enumerate(certs):
            out.write(f"dn: {ldap_dn(i)}\nobjectClass: inetOrgPerson\n"
                      f"uid: person{i:06d}\ncn: person{i:06d}\nsn: person\n"
                      f"mail: {person_id(i)}\n"
                      f"labeledURI: irp [{person_address(i)}]:4605 default\n"
                      f"userCertificate;binary:: {base64.b64encode(der).decode()}\n")
            if i in passwords:
                out.write(f"userPassword: pw{i}\n")
            out.write("\n")


def slapd_config(base: Path, cert: Path, key: Path, ca: Path) -> Path:
    conf = base / "slapd.conf"
    (base / "db").mkdir()
    conf.write_text(f"""
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile {base}/slapd.pid
TLSCertificateFile {cert}
TLSCertificateKeyFile {key}
TLSCACertificateFile {ca}
loglevel 0
database mdb
maxsize 4294967296
suffix "dc=example,dc=test"
directory {base}/db
index uid eq
access to attrs=userPassword by self write by anonymous auth by * none
access to * by self write by users read by * none
""")
    return conf


# -- main ---------------------------------------------------------------------------------------


def start_floor(base: Path, ca: LabCA, cert: Path, key: Path,
                answer: bytes) -> tuple[subprocess.Popen, int]:
    """benchmarks/tls_floor.py answering with `answer` (see there)."""
    (base / "answer.xml").write_bytes(answer)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("tls_floor.py")), str(port),
         str(ca.directory / "ca.pem"), str(cert), str(key), str(base / "answer.xml")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, running=lambda: server.poll() is None)
    return server, port


def client_context(ca_pem: Path, cert: Path | None = None,
                   key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_pem))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


async def measure(args: argparse.Namespace) -> dict:
    base = Path(tempfile.mkdtemp(prefix="irp-bench-"))
    looked_up = min(args.hot or args.persons, args.persons)
    result: dict = {"persons": args.persons, "clients": args.clients, "seconds": args.seconds,
                    "rounds": args.rounds, "workers": args.workers,
                    "lookup_persons": looked_up, "machine": {"cpus": os.cpu_count()}}
    servers: list[subprocess.Popen] = []
    targets: list[Target] = []
    try:
        ca = LabCA.init(base / "ca", name="bench CA")
        host_cert, host_key, _ = ca.issue("host", HOST, out=base / "host")
        progress(f"making {args.persons} certificates")
        t0 = time.monotonic()
        certs = make_population(ca, args.persons)
        result["setup_certificates_s"] = round(time.monotonic() - t0, 1)
        clients = list(range(args.clients))
        contexts = []
        for i in clients:
            user_cert, user_key, _ = ca.issue("user", person_id(i), out=base / "users" / str(i))
            contexts.append(client_context(ca.directory / "ca.pem", user_cert, user_key))

        # sixnet
        state = base / "state"
        state.mkdir()
        progress("filling the registry database")
        fill_registry_database(state / "irp.sqlite3", certs)
        port = free_port()
        config = config_file(base, sixnet_toml(
            ca.directory, {"host": IdentityFiles(HOST, host_cert, host_key)}, lab_ca=True,
            sixnet={"state_dir": state},
            irp={"enabled": True, "listen": [f"tcp:{port}:interface=127.0.0.1"],
                 "max_connections_per_address": args.clients + 10,
                 "workers": args.workers}))
        profile = ["--profile", str(args.profile), "--profiler", "cprofile", "--savestats"] \
            if args.profile else []
        registry = subprocess.Popen(twistd_command("sixnet-irp", config, twistd_options=profile),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    cwd=base)
        servers.append(registry)
        wait_for_port(port, running=lambda: registry.poll() is None)
        while len(process_tree(registry.pid)) < 1 + (args.workers if args.workers > 1 else 0):
            time.sleep(0.1)
        rss_start = tree_rss(registry.pid)
        cpu_start = tree_cpu(registry.pid)
        sixnet = Target("sixnet", [await IRPSession.open(port, c) for c in contexts],
                        irp_lookup, irp_register, lambda: tree_cpu(registry.pid))
        targets.append(sixnet)
        await sixnet.first_lookups(looked_up)

        # the floor, answering with what the registry answered
        floor_server, floor_port = start_floor(base, ca, host_cert, host_key,
                                               sixnet.sessions[0].last_answer)
        servers.append(floor_server)
        floor = Target("twisted TLS floor",
                       [await IRPSession.open(floor_port, c) for c in contexts], irp_lookup,
                       None, lambda: cpu_seconds(floor_server.pid))
        targets.append(floor)

        # slapd
        slapd_path = shutil.which("slapd") or "/usr/sbin/slapd"
        slapd = None
        if args.slapd == "no":
            result["slapd"] = "skipped: --slapd no"
        elif not Path(slapd_path).exists():
            result["slapd"] = "skipped: slapd is not installed"
        else:
            progress("slapd: loading the same records")
            ldap_base = base / "ldap"
            ldap_base.mkdir()
            conf = slapd_config(ldap_base, host_cert, host_key, ca.directory / "ca.pem")
            ldif = ldap_base / "people.ldif"
            write_ldif(ldif, certs, clients)
            t0 = time.monotonic()
            subprocess.run([slapd_path.replace("slapd", "slapadd"), "-q", "-f", str(conf),
                            "-l", str(ldif)], check=True, capture_output=True)
            result["setup_slapadd_s"] = round(time.monotonic() - t0, 1)
            ldap_port = free_port()
            ldap_server = subprocess.Popen(
                [slapd_path, "-d", "0", "-f", str(conf), "-h", f"ldaps://127.0.0.1:{ldap_port}/"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            servers.append(ldap_server)
            wait_for_port(ldap_port, running=lambda: ldap_server.poll() is None)
            slapd = Target("slapd", await ldap_sessions(
                ldap_port, client_context(ca.directory / "ca.pem"), clients),
                ldap_lookup, ldap_register, lambda: cpu_seconds(ldap_server.pid))
            targets.append(slapd)
            await slapd.first_lookups(looked_up)

        # the rounds, taking turns: a machine's slow minute falls on every server alike
        for phase in ("lookups", "registrations"):
            for n in range(args.rounds):
                for target in targets:
                    if phase == "lookups" or target.register is not None:
                        progress(f"{target.name}: {phase}, round {n + 1} of {args.rounds}")
                        await target.run_round(phase, looked_up, args.seconds, n)

        irp = sixnet.summary()
        irp["server_cpu_s"] = round(tree_cpu(registry.pid) - cpu_start, 2)
        rss_end = tree_rss(registry.pid)
        db_bytes = sum(p.stat().st_size for p in state.glob("irp.sqlite3*"))
        irp["rss_kib_start"] = rss_start
        irp["rss_kib_end"] = rss_end
        irp["rss_bytes_per_person"] = round(rss_end * 1024 / args.persons, 1)
        irp["database_bytes_per_person"] = round(db_bytes / args.persons, 1)
        result["sixnet"] = irp
        result["twisted_tls_floor"] = {**floor.summary(),
                                       "answer_bytes": len(sixnet.sessions[0].last_answer)}
        if slapd is None:
            return result
        ldap = slapd.summary()
        ldap["rss_kib_end"] = rss_kib(servers[-1].pid)
        ldap["rss_bytes_per_person"] = round(ldap["rss_kib_end"] * 1024 / args.persons, 1)
        result["slapd"] = ldap
        ratios = {}
        for phase in ("first_lookups", "lookups", "registrations"):
            ours, theirs = irp[phase].get("per_second"), ldap[phase].get("per_second")
            if ours and theirs:
                ratios[f"{phase}_per_second_sixnet_over_slapd"] = round(ours / theirs, 3)
        for phase in ("lookups", "registrations"):
            ratios[f"{phase}_rounds_sixnet_over_slapd"] = [
                round(a.get("per_second", 0) / b["per_second"], 3)
                for a, b in zip(sixnet.rounds[phase], slapd.rounds[phase], strict=True)
                if b.get("per_second")]
        floor_rate = result["twisted_tls_floor"]["lookups"].get("per_second")
        if floor_rate and ldap["lookups"].get("per_second"):
            ratios["lookups_per_second_floor_over_slapd"] = round(
                floor_rate / ldap["lookups"]["per_second"], 3)
        result["ratios"] = ratios
        return result
    finally:
        for target in targets:
            target.close()
        for server in servers:
            server.terminate()
            server.wait(10)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--persons", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="length of one round of lookups or registrations")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of each phase, the servers taking turns (default 3)")
    parser.add_argument("--hot", type=int, default=0,
                        help="look up random persons among the first N only (default: all)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 1),
                        help="registry processes (default: CPUs less the load generator's one)")
    parser.add_argument("--slapd", choices=("yes", "no"), default="yes",
                        help="also measure slapd (default yes)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--profile", type=Path, help="cProfile the registry's reactor thread "
                                                     "into this file")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args)), indent=2))


if __name__ == "__main__":
    main()
