"""The ``sixnet grid`` lab commands against a real sixnet grid server over loopback TLS.

Most run in-process (`execute` on the test's reactor, stdout captured); one round runs the
real ``python -m sixnet`` as a subprocess, Ctrl-C included. The issue's round trip: create,
subscribe (pending), approve, publish files while the follower is away, follow (the stored
notifications first, with delay stamps, then a live one), items paged, ``--json`` parsed."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from sixnet.app.cli import build_parser
from sixnet.core.cli import Output
from sixnet.core.errors import CommandError
from sixnet.grid.client import PubSubClient, connect
from sixnet.grid.client.cli import EXIT_UNREACHABLE, execute
from tests.grid_harness import ports, start_grid, user_files, write_config
from tests.support.iodef import IODEF, IODEF_NS
from tests.support.waiting import wait_for


class LabCommandTests(unittest.TestCase):
    @pytest.fixture(autouse=True)
    def _setup(self, pki: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pki = pki
        self.tmp = tmp_path
        self.monkeypatch = monkeypatch

    def setUp(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        self.config = write_config(self.tmp, self.pki)
        self.grid = await start_grid(self.config)
        self.addCleanup(self.grid.stopService)
        self.port, self.tls_port = ports(self.grid)
        for name in ("alice", "bob", "carol"):
            await self.grid.accounts.add(name, f"{name} secret")
            (self.tmp / f"{name}.pw").write_text(f"{name} secret\n")
        self.iodef = self.tmp / "incident.xml"
        self.iodef.write_text(IODEF)

    def _args(self, user: str, argv: tuple[str, ...]) -> list[str]:
        login = ["--jid", f"{user}@localhost", "--password-file", str(self.tmp / f"{user}.pw")]
        if "--certificate" in argv or "--password-stdin" in argv:
            login = []
        server = [] if "--server" in argv else ["--server", f"127.0.0.1:{self.port}"]
        return ["grid", *argv, "--config", str(self.config.path), *server, "--timeout", "5",
                *login]

    async def lab(self, user: str, *argv: str, stdin: bytes = b"") -> tuple[int, str, str]:
        """Run one command in-process as `user`: (exit status, stdout, stderr)."""
        args = build_parser().parse_args(self._args(user, argv))
        self.monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                status = await execute(args, Output(args.json), args.work(args))
            except CommandError as e:
                print(f"sixnet: {e}", file=sys.stderr)
                status = e.status
        return status, stdout.getvalue(), stderr.getvalue()

    async def ok(self, user: str, *argv: str, stdin: bytes = b"") -> Any:
        status, out, err = await self.lab(user, *argv, "--json", stdin=stdin)
        assert status == 0, err
        return json.loads(out)

    async def test_follow_names_what_it_took_and_does_not_show(self) -> None:
        for topic in ("t1", "t2"):
            await self.ok("alice", "create", topic, "--access-model", "authorize")
            await self.ok("bob", "subscribe", topic)
            await self.ok("alice", "approve", topic, "bob@localhost")
        await self.ok("alice", "publish", "t2", str(self.iodef), "--id", "two")
        await self.ok("alice", "publish", "t1", str(self.iodef), "--id", "one")
        await self.grid.broker.idle()
        status, out, err = await self.lab("bob", "follow", "t1", "--count", "1", "--json")
        assert status == 0, err
        assert [json.loads(line)["id"] for line in out.splitlines()] == ["one"]
        assert "not shown: item two of topic t2" in err
        await self.ok("alice", "publish", "t2", str(self.iodef), "--id", "three")
        await self.grid.broker.idle()
        status, out, err = await self.lab("bob", "follow", "--count", "1", "--json")
        assert status == 0, err
        assert [(n["node"], n["id"]) for n in map(json.loads, out.splitlines())] == [
            ("t2", "three")]

    async def test_round_trip(self) -> None:
        created = await self.ok("alice", "create", "alerts", "--access-model", "authorize",
                                "--option", f"type={IODEF_NS}", "--option",
                                "pubsub#title=Alerts")
        assert created == {"created": "alerts"}
        info = await self.ok("bob", "info", "alerts")
        assert info["type"] == IODEF_NS and info["access_model"] == "authorize"
        assert info["owners"] == ["alice@localhost"]

        assert (await self.ok("bob", "subscribe", "alerts"))["subscription"] == "pending"
        pending = await self.ok("alice", "pending", "alerts")
        assert [p["jid"] for p in pending["pending"]] == ["bob@localhost"]
        approved = await self.ok("alice", "approve", "alerts", "bob@localhost")
        assert approved["approved"] == ["bob@localhost"]
        assert (await self.ok("alice", "pending", "alerts"))["pending"] == []

        # bob is away: these wait in his offline store.
        ids = []
        for n in range(3):
            ids.append((await self.ok("alice", "publish", "alerts", str(self.iodef),
                                      "--id", f"away{n}"))["id"])
        assigned = (await self.ok("alice", "publish", "alerts", "-",
                                  stdin=IODEF.encode()))["id"]
        assert ids == ["away0", "away1", "away2"] and assigned not in ids
        await self.grid.broker.idle()

        follow = defer.ensureDeferred(self.lab("bob", "follow", "alerts", "--count", "5",
                                               "--json"))
        await wait_for(lambda: self.grid.router.is_available("bob@localhost"))
        publisher = await connect(reactor, "127.0.0.1", self.port, "alice@localhost",
                                  password="alice secret", store=self.grid.tls.store)
        self.addCleanup(publisher.close)
        await PubSubClient(publisher, "broker.localhost").publish(
            "alerts", etree.fromstring(IODEF), "live")
        status, out, err = await follow
        assert status == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        assert [n["id"] for n in lines] == [*ids, assigned, "live"]
        assert all(n["delay"] for n in lines[:4]) and lines[4]["delay"] is None
        assert etree.QName(etree.fromstring(lines[0]["payload"])).namespace == IODEF_NS

        first = await self.ok("bob", "items", "alerts", "--max", "2")
        assert [i["id"] for i in first["items"]] == ["away0", "away1"]
        assert first["count"] == 5 and first["last"] == "away1" and first["index"] == 0
        rest = await self.ok("bob", "items", "alerts", "--max", "10", "--after", first["last"])
        assert [i["id"] for i in rest["items"]] == ["away2", assigned, "live"]
        status, text, _ = await self.lab("bob", "items", "alerts", "--max", "1")
        assert "(1 of 5; next page: --after away0)" in text
        status, text, _ = await self.lab("bob", "items", "alerts", "--after", "away2")
        assert text.endswith("(2 of 5)\n")

        for n in range(3):
            await self.ok("alice", "create", f"more{n}")
        page = await self.ok("bob", "topics", "--max", "2")
        assert [t["node"] for t in page["topics"]] == ["alerts", "more0"]
        assert page["count"] == 4
        page = await self.ok("bob", "topics", "--max", "2", "--after", page["last"])
        assert [t["node"] for t in page["topics"]] == ["more1", "more2"]

        await self.ok("carol", "subscribe", "alerts")
        assert (await self.ok("alice", "deny", "alerts", "carol"
                              "@localhost"))["denied"] == ["carol@localhost"]
        affiliations = await self.ok("alice", "affiliations", "alerts")
        assert affiliations["affiliations"] == [{"jid": "alice@localhost",
                                                 "affiliation": "owner"}]
        options = await self.ok("alice", "configure", "alerts", "--option", "max_items=3")
        assert options["options"]["pubsub#max_items"] == ["3"]
        assert (await self.ok("alice", "configure", "alerts"))["options"][
            "pubsub#max_items"] == ["3"]
        assert await self.ok("bob", "unsubscribe", "alerts") == {"unsubscribed": "alerts"}
        assert await self.ok("alice", "delete", "alerts") == {"deleted": "alerts"}

    async def test_errors_are_one_line_with_their_exit_status(self) -> None:
        await self.ok("alice", "create", "t")
        status, _, err = await self.lab("bob", "delete", "t")
        assert status == 1 and err.count("\n") == 1
        assert "the server refused: forbidden" in err
        status, _, err = await self.lab("bob", "info", "nothing")
        assert status == 1 and "item-not-found" in err
        status, _, err = await self.lab("alice", "configure", "t", "--option", "colour=red")
        assert status == 1 and "pubsub#colour: not an option" in err
        status, _, err = await self.lab("alice", "approve", "t", "bob@localhost")
        assert status == 1 and "no pending subscription" in err

        (self.tmp / "alice.pw").write_text("wrong\n")
        status, _, err = await self.lab("alice", "topics")
        assert status == EXIT_UNREACHABLE and err.count("\n") == 1
        assert "login as alice@localhost refused: not-authorized" in err

        for content, problem in ((b"not xml", "not one XML element"),
                                 (b"<a/><b/>", "not one XML element"),
                                 (b"<!DOCTYPE a [<!ENTITY e 'x'>]><a>&e;</a>", "DOCTYPE"),
                                 (b"<!DOCTYPE a SYSTEM 'file:///etc/passwd'><a/>", "DOCTYPE")):
            bad = self.tmp / "bad.xml"
            bad.write_bytes(content)
            status, _, err = await self.lab("bob", "publish", "t", str(bad))
            assert status == 2 and problem in err and err.count("\n") == 1, err
        status, _, err = await self.lab("bob", "publish", "t", "-", "--password-stdin")
        assert status == 2 and "standard input" in err
        status, _, err = await self.lab("bob", "topics", "--server", "127.0.0.1:1")
        assert status == EXIT_UNREACHABLE and "cannot connect" in err
        status, _, err = await self.lab("bob", "topics", "--server-name", "grid.example.org")
        assert status == EXIT_UNREACHABLE and "not for host" in err

    async def test_external_login_and_password_from_stdin(self) -> None:
        cert, key = user_files(self.pki, "dave@localhost")
        created = await self.ok("dave", "create", "sensors", "--certificate", cert, "--key",
                                key)
        assert created == {"created": "sensors"}
        affiliations = await self.ok("dave", "affiliations", "sensors", "--certificate",
                                     cert, "--key", key)
        assert affiliations["affiliations"][0]["jid"] == "dave@localhost"
        topics = await self.ok("bob", "topics", "--password-stdin", "--jid", "bob@localhost",
                               stdin=b"bob secret\n")
        assert [t["node"] for t in topics["topics"]] == ["sensors"]

    async def _sixnet(self, user: str, *argv: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "sixnet", *self._args(user, argv)]
        return await threads.deferToThread(subprocess.run, command, capture_output=True,
                                           text=True, timeout=60)

    async def test_as_a_process_including_ctrl_c(self) -> None:
        owner = await connect(reactor, "127.0.0.1", self.port, "alice@localhost",
                              password="alice secret", store=self.grid.tls.store)
        self.addCleanup(owner.close)
        pubsub = PubSubClient(owner, "broker.localhost")
        await pubsub.create("open", access_model="whitelist")
        done = await self._sixnet("alice", "topics", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["topics"] == [{"node": "open", "name": None}]
        done = await self._sixnet("bob", "subscribe", "open")
        assert done.returncode == 1 and done.stderr.count("\n") == 1
        assert "not-allowed/closed-node" in done.stderr

        command = [sys.executable, "-m", "sixnet", *self._args("alice", ("follow", "open"))]
        printed = self.tmp / "follow.out"
        with printed.open("w") as stdout:
            process = subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE,
                                       text=True)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        await wait_for(lambda: self.grid.router.is_available("alice@localhost"), timeout=30)
        await pubsub.subscribe("open")
        await pubsub.publish("open", etree.fromstring(IODEF), "seen")
        await wait_for(lambda: b"</item>" in printed.read_bytes(), timeout=30)
        process.send_signal(signal.SIGINT)
        _, err = await threads.deferToThread(process.communicate, timeout=30)
        assert process.returncode == 0, err
        item = etree.fromstring(printed.read_text().strip())
        assert item.get("id") == "seen" and item.get("node") == "open"
        assert etree.QName(item[0]).namespace == IODEF_NS
