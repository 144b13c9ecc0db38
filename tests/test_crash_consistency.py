"""Crash consistency: SIGKILL a real twistd during acknowledged writes, restart it on the same
state directory, and find every acknowledged write (tests/support/crash.py says how). On
SQLite (WAL, synchronous=FULL) and on PostgreSQL, each service with its own database.

A few iterations here (about 30 s in all); benchmarks/crash.py runs as many as one asks for.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.trial import unittest

from tests.support.crash import DATABASE_KEYS, CrashLab, Figures
from tests.support.databases import postgres_schema_url, postgres_unavailable

KINDS = ("pubsub", "irp", "chat")
#: Seconds of writing before each kill, at random between these.
WRITING = (0.2, 0.7)


class CrashConsistencyTests(unittest.TestCase):
    timeout = 120

    @pytest.fixture(autouse=True)
    def _lab(self, pki: Any, tmp_path: Path) -> None:
        self.pki = pki
        self.tmp = tmp_path

    def check(self, figures: Figures, iterations: int, seed: int) -> None:
        report = f"seed {seed}: " + json.dumps(figures.as_json(), indent=1)
        assert figures.iterations == iterations, report
        assert figures.lost == dict.fromkeys(KINDS, 0), report
        assert figures.unaudited == dict.fromkeys(KINDS, 0), report
        assert figures.torn_audit_lines == 0, report
        # every kind of write was under way at each kill
        assert all(figures.acknowledged[kind] >= iterations for kind in KINDS), report

    async def test_acknowledged_writes_survive_sigkill_on_sqlite(self) -> None:
        seed = int(time.time())
        figures = await CrashLab(self.tmp, self.pki).run(5, random.Random(seed), WRITING)
        self.check(figures, 5, seed)

    async def test_acknowledged_writes_survive_sigkill_on_postgresql(self) -> None:
        if (reason := postgres_unavailable()) is not None:
            raise unittest.SkipTest(reason)
        seed = int(time.time())
        databases = {key: postgres_schema_url(self) for key in DATABASE_KEYS}
        figures = await CrashLab(self.tmp, self.pki, databases=databases).run(
            2, random.Random(seed), WRITING)
        self.check(figures, 2, seed)

    async def test_the_check_finds_lost_writes(self) -> None:
        """Put back the state directory of the first kill after the second: the second run's
        acknowledged writes are gone, and each kind of write says so."""
        lab = CrashLab(self.tmp, self.pki)
        saved = self.tmp / "saved-state"

        def rewind(run: int) -> None:
            if run == 0:
                shutil.copytree(lab.state, saved)
            else:
                shutil.rmtree(lab.state)
                shutil.copytree(saved, lab.state)

        figures = await lab.run(2, random.Random(0), WRITING, after_kill=rewind)
        report = json.dumps(figures.as_json(), indent=1)
        assert all(figures.lost[kind] > 0 for kind in KINDS), report
