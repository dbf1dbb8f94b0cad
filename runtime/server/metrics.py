"""Prometheus text exposition (format 0.0.4) for a handful of counters, gauges and histograms.

Small on purpose: the server needs labelled counters, gauges read at scrape time and fixed-bucket histograms,
all safe to update from the engine thread and the event loop at once.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help_text, labels
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()):
        super().__init__(name, help_text, labels)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.label_names:
            items = [((), 0.0)]
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Gauge(_Metric):
    """A value read when scraped (`read` is called then), or set directly."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], float] | None = None):
        super().__init__(name, help_text)
        self._read = read
        self._value = 0.0

    def set(self, value: float) -> None:
        self._value = float(value)

    def render(self) -> list[str]:
        value = self._read() if self._read is not None else self._value
        return self.header() + [f"{self.name} {_number(value)}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()):
        super().__init__(name, help_text, labels)
        self.bounds = tuple(sorted(buckets)) + (math.inf,)
        self._series: dict[tuple[str, ...], list[float]] = {}  # labels -> bucket counts..., sum, count

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            series = self._series.setdefault(labels, [0.0] * (len(self.bounds) + 2))
            for i, bound in enumerate(self.bounds):
                if value <= bound:
                    series[i] += 1  # cumulative buckets: every bound at or above the value
            series[-2] += value
            series[-1] += 1

    def count(self, *labels: str) -> int:
        with self._lock:
            return int(self._series.get(labels, [0.0])[-1])

    def render(self) -> list[str]:
        lines = self.header()
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        for key, series in items:
            for bound, total in zip(self.bounds, series):
                le = 'le="' + _number(bound) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {_number(total)}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(series[-2])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {_number(series[-1])}")
        return lines


class ServerMetrics:
    """Everything /metrics shows. Gauges read the engine's state at scrape time."""

    def __init__(self) -> None:
        self.requests = Counter("onnxgen_requests_total", "HTTP requests answered.", ("endpoint", "status"))
        self.prompt_tokens = Counter("onnxgen_prompt_tokens_total", "Prompt tokens of admitted requests.")
        self.generated_tokens = Counter("onnxgen_generated_tokens_total", "Tokens generated, all sequences.")
        self.rejected = Counter("onnxgen_rejected_requests_total", "Requests refused by a limit.", ("reason",))
        self.latency = Histogram(
            "onnxgen_request_duration_seconds", "Time from request to last byte.", LATENCY_BUCKETS, ("endpoint",)
        )
        self.first_token = Histogram(
            "onnxgen_time_to_first_token_seconds", "Time from admission to the first generated token.", LATENCY_BUCKETS
        )
        self.queue_wait = Histogram(
            "onnxgen_queue_wait_seconds", "Time a request waited for a place in the batch.", LATENCY_BUCKETS
        )
        self.step = Histogram("onnxgen_step_duration_seconds", "One generator step (all live rows).", STEP_BUCKETS)
        self.gauges: list[Gauge] = []

    def add_gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges.append(Gauge(name, help_text, read))

    def render(self) -> str:
        metrics: list[_Metric] = [
            self.requests, self.prompt_tokens, self.generated_tokens, self.rejected,
            self.latency, self.first_token, self.queue_wait, self.step, *self.gauges,
        ]
        lines: list[str] = []
        for metric in metrics:
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"
