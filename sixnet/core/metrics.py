"""Process metrics in the Prometheus text format (version 0.0.4), without a client library.

Services get the process's one `Registry` from the composition root and register their
counters and gauges once, at build time; the metrics endpoint renders it on each scrape.
Rates (stanzas per second, notifications per second) are what Prometheus's ``rate()`` makes
of the ``_total`` counters. A gauge may read its value when scraped (a queue depth), so
nothing has to be kept up to date on the hot path.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

LabelValues = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Iterable[str]) -> None:
        if not _NAME.match(name):
            raise ValueError(f"bad metric name {name!r}")
        self.name = name
        self.help = help_text
        self.label_names = tuple(labels)
        for label in self.label_names:
            if not _LABEL.match(label) or label.startswith("__"):
                raise ValueError(f"bad label name {label!r}")
        self._values: dict[LabelValues, float] = {}

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def samples(self) -> Iterable[tuple[LabelValues, float]]:
        return sorted(self._values.items())

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help.replace(chr(92), chr(92) * 2)}",
                 f"# TYPE {self.name} {self.kind}"]
        for values, value in self.samples():
            if values:
                pairs = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(self.label_names, values,
                                                                       strict=True))
                lines.append(f"{self.name}{{{pairs}}} {_number(value)}")
            else:
                lines.append(f"{self.name} {_number(value)}")
        return "\n".join(lines) + "\n"


class Counter(_Metric):
    """Only goes up; its name ends in ``_total``."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Iterable[str] = ()) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name!r} must end in _total")
        super().__init__(name, help_text, labels)
        if not self.label_names:
            self._values[()] = 0.0

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter cannot go down")
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Metric):
    """Goes up and down: set it, or give `read` to compute it at scrape time.

    `read` returns the value (no labels) or a mapping of label-value tuples to values.
    """

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labels: Iterable[str] = (),
                 read: Callable[[], float | dict[LabelValues, float]] | None = None) -> None:
        super().__init__(name, help_text, labels)
        self._read = read

    def set(self, value: float, **labels: str) -> None:
        self._values[self._key(labels)] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)

    def samples(self) -> Iterable[tuple[LabelValues, float]]:
        if self._read is None:
            return super().samples()
        value = self._read()
        if isinstance(value, dict):
            return sorted(value.items())
        return [((), float(value))]


class Registry:
    """The process's metrics, rendered in registration order."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def _add(self, metric: _Metric) -> _Metric:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name!r} registered twice")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help_text: str, labels: Iterable[str] = ()) -> Counter:
        metric = Counter(name, help_text, labels)
        self._add(metric)
        return metric

    def gauge(self, name: str, help_text: str, labels: Iterable[str] = (),
              read: Callable[[], float | dict[LabelValues, float]] | None = None) -> Gauge:
        metric = Gauge(name, help_text, labels, read)
        self._add(metric)
        return metric

    def render(self) -> bytes:
        return "".join(m.render() for m in self._metrics.values()).encode("utf-8")
