"""Process metrics in the Prometheus text format (version 0.0.4), without a client library.

Services get the process's one `Registry` from the composition root and register their
counters and gauges once, at build time; the metrics endpoint (`sixnet.core.metrics_http`)
renders it on each scrape. Rates (stanzas per second, notifications per second) are what
Prometheus's ``rate()`` makes of the ``_total`` counters.

The hot path pays one attribute increment: a service takes the `Series` of each label
combination it counts once, at build time (``counter.labels(kind="message")``), and calls
``series.inc()`` where the event happens; no label dictionary is built per event. A gauge
may read its value when scraped (a queue depth, a count of sessions), so nothing has to be
kept up to date on the hot path at all.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from twisted.logger import Logger

log = Logger(namespace="sixnet")

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

LabelValues = tuple[str, ...]
Reading = float | dict[LabelValues, float]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Series:
    """The value of one label combination of a counter (only `inc`) or a gauge."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0


class CounterSeries(Series):
    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter cannot go down")
        self.value += amount


class GaugeSeries(Series):
    __slots__ = ()

    def set(self, value: float) -> None:
        self.value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class _Metric:
    kind = ""
    series_type: type[Series] = Series

    def __init__(self, name: str, help_text: str, labels: Iterable[str] = (),
                 read: Callable[[], Reading] | None = None) -> None:
        if not _NAME.match(name):
            raise ValueError(f"bad metric name {name!r}")
        self.name = name
        self.help = help_text
        self.label_names = tuple(labels)
        for label in self.label_names:
            if not _LABEL.match(label) or label.startswith("__"):
                raise ValueError(f"bad label name {label!r}")
        if len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"{name}: a label is named twice")
        self._read = read
        self._series: dict[LabelValues, Series] = {}
        if not self.label_names and read is None:
            self._series[()] = self.series_type()

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def _get(self, labels: dict[str, str]) -> Series:
        if self._read is not None:
            raise ValueError(f"{self.name} is read when scraped; it cannot be changed")
        key = self._key(labels)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = self.series_type()
        return series

    def samples(self) -> Iterable[tuple[LabelValues, float]]:
        if self._read is None:
            return sorted((k, s.value) for k, s in self._series.items())
        value = self._read()
        if isinstance(value, dict):
            for key in value:
                if len(key) != len(self.label_names):
                    raise ValueError(f"{self.name}: read gave labels {key!r}")
            return sorted((k, float(v)) for k, v in value.items())
        return [((), float(value))]

    def render(self, more: Iterable[Sample] = ()) -> str:
        """The family in the text format; `more`: samples of other processes (`Family`)."""
        lines = [f"# HELP {self.name} {_escape_help(self.help)}",
                 f"# TYPE {self.name} {self.kind}"]
        for values, value in self.samples():
            lines.append(_sample(self.name, tuple(zip(self.label_names, values, strict=True)),
                                 value))
        lines.extend(_sample(self.name, labels, value) for labels, value in more)
        return "\n".join(lines) + "\n"

    def family(self) -> Family:
        """This metric's current samples as plain data, for another process to show."""
        return Family(self.name, self.kind, self.help, [
            (tuple(zip(self.label_names, values, strict=True)), value)
            for values, value in self.samples()])


#: One sample of a family: its label pairs and its value.
Sample = tuple[tuple[tuple[str, str], ...], float]


@dataclass
class Family:
    """A metric's samples as another process reported them (`Registry.collect`)."""

    name: str
    kind: str
    help: str
    samples: list[Sample]


def _sample(name: str, labels: tuple[tuple[str, str], ...], value: float) -> str:
    if not labels:
        return f"{name} {_number(value)}"
    pairs = ",".join(f'{n}="{_escape(v)}"' for n, v in labels)
    return f"{name}{{{pairs}}} {_number(value)}"


class Counter(_Metric):
    """Only goes up; its name ends in ``_total``.

    Give `read` for a count kept elsewhere (CPU time, a component's own tally), read when
    scraped like a gauge's; `read` must never go down.
    """

    kind = "counter"
    series_type = CounterSeries

    def __init__(self, name: str, help_text: str, labels: Iterable[str] = (),
                 read: Callable[[], Reading] | None = None) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name!r} must end in _total")
        super().__init__(name, help_text, labels, read)

    def labels(self, **labels: str) -> CounterSeries:
        """The series of one label combination (take it once, increment it often)."""
        series = self._get(labels)
        assert isinstance(series, CounterSeries)
        return series

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self.labels(**labels).inc(amount)


class Gauge(_Metric):
    """Goes up and down: set it, or give `read` to compute it at scrape time.

    `read` returns the value (no labels) or a mapping of label-value tuples to values.
    """

    kind = "gauge"
    series_type = GaugeSeries

    def labels(self, **labels: str) -> GaugeSeries:
        series = self._get(labels)
        assert isinstance(series, GaugeSeries)
        return series

    def set(self, value: float, **labels: str) -> None:
        self.labels(**labels).set(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self.labels(**labels).inc(amount)

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.labels(**labels).dec(amount)


class Registry:
    """The process's metrics, rendered in registration order."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._collectors: list[Callable[[], Iterable[Family]]] = []

    def _add(self, metric: _Metric) -> _Metric:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name!r} registered twice")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help_text: str, labels: Iterable[str] = (),
                read: Callable[[], Reading] | None = None) -> Counter:
        metric = Counter(name, help_text, labels, read)
        self._add(metric)
        return metric

    def gauge(self, name: str, help_text: str, labels: Iterable[str] = (),
              read: Callable[[], Reading] | None = None) -> Gauge:
        metric = Gauge(name, help_text, labels, read)
        self._add(metric)
        return metric

    def collect(self, collector: Callable[[], Iterable[Family]]) -> None:
        """Show the families `collector` gives on each scrape besides this process's own
        (another process's, such as an IRP worker's, labelled so their samples differ)."""
        self._collectors.append(collector)

    def families(self) -> list[Family]:
        """This process's own metrics as plain data (what a worker reports)."""
        out = []
        for metric in self._metrics.values():
            try:
                out.append(metric.family())
            except Exception:
                log.failure("metric {name} could not be read", name=metric.name)
        return out

    def render(self) -> bytes:
        """Every metric; one whose gauge cannot be read is left out (and logged), so one
        broken reading does not cost the whole scrape. Collected samples of a family this
        process has too are shown in its family; the others as families of their own."""
        collected: dict[str, Family] = {}
        for collector in self._collectors:
            for family in collector():
                known = collected.setdefault(
                    family.name, Family(family.name, family.kind, family.help, []))
                known.samples.extend(family.samples)
        parts = []
        for metric in self._metrics.values():
            more = collected.pop(metric.name, None)
            try:
                parts.append(metric.render(more.samples if more else ()))
            except Exception:
                log.failure("metric {name} could not be read", name=metric.name)
        for family in collected.values():
            parts.append(f"# HELP {family.name} {_escape_help(family.help)}\n"
                         f"# TYPE {family.name} {family.kind}\n"
                         + "".join(_sample(family.name, labels, value) + "\n"
                                   for labels, value in family.samples))
        return "".join(parts).encode("utf-8")


# -- the process ---------------------------------------------------------------------------------

_PROC = "/proc/self"


def register_process_metrics(registry: Registry, proc: str = _PROC) -> bool:
    """The process's memory, CPU time and open files, read from ``/proc`` when scraped
    (False, and nothing registered, where there is no ``/proc``: not Linux)."""
    if not os.path.exists(f"{proc}/stat"):
        return False
    ticks = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")

    def stat_fields() -> list[str]:
        with open(f"{proc}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
        return text[text.rindex(")") + 2:].split()  # after the command name, which may hold spaces

    def cpu() -> float:
        fields = stat_fields()
        return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15)

    def resident() -> float:
        return int(stat_fields()[21]) * page  # rss (field 24), in pages

    def virtual() -> float:
        return int(stat_fields()[20])  # vsize (field 23), in bytes

    def open_fds() -> float:
        return len(os.listdir(f"{proc}/fd"))

    def max_fds() -> float:
        with open(f"{proc}/limits", "rb") as f:
            for line in f:
                if line.startswith(b"Max open files"):
                    soft = line.split()[3]
                    return math.inf if soft == b"unlimited" else int(soft)
        return math.nan

    def start_time() -> float:
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime"))
        return boot + int(stat_fields()[19]) / ticks  # starttime (field 22), ticks after boot

    registry.counter("process_cpu_seconds_total", "User and system CPU time spent, in seconds.",
                     read=cpu)
    registry.gauge("process_resident_memory_bytes", "Resident memory size in bytes.",
                   read=resident)
    registry.gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.",
                   read=virtual)
    registry.gauge("process_open_fds", "Number of open file descriptors.", read=open_fds)
    registry.gauge("process_max_fds", "Maximum number of open file descriptors.", read=max_fds)
    registry.gauge("process_start_time_seconds",
                   "Start time of the process since the Unix epoch, in seconds.",
                   read=start_time)
    return True
