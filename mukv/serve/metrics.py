"""Metrics in the Prometheus text exposition format (version 0.0.4), names prefixed ``mukv_``.

A few small thread-safe instruments (counters, gauges, histograms, with labels) and one
registry that renders them; gauges that mirror state (queue depths, lag, bytes) are filled by a
collector callback at scrape time, so nothing has to keep them current.
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Iterable

#: Buckets (seconds) of question latencies: first token and whole answer.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
#: Buckets (frames) of ingest steps.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    v = float(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def remove(self, *values: str) -> None:
        with self._lock:
            self._values.pop(tuple(values), None)  # type: ignore[attr-defined]


class Counter(_Metric):
    """A value that only goes up (``..._total``)."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, *values: str) -> None:
        with self._lock:
            self._values[values] = self._values.get(values, 0.0) + amount

    def set_total(self, value: float, *values: str) -> None:
        """Mirror a total kept elsewhere (it only goes up, or restarts from 0 with its stream)."""
        with self._lock:
            self._values[values] = float(value)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in items]


class Gauge(_Metric):
    """A value that goes up and down, set when it changes or at scrape time."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {}

    def set(self, value: float, *values: str) -> None:
        with self._lock:
            self._values[values] = float(value)

    def reset(self) -> None:
        with self._lock:
            self._values.clear()

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in items]


class Histogram(_Metric):
    """Observations counted in cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float], labels: tuple[str, ...] = ()):
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(float(b) for b in buckets))
        self._values: dict[tuple[str, ...], list[float]] = {}  # counts per bucket, +Inf, sum

    def observe(self, value: float, *values: str) -> None:
        with self._lock:
            row = self._values.setdefault(values, [0.0] * (len(self.buckets) + 2))
            for i, b in enumerate(self.buckets):
                if value <= b:
                    row[i] += 1
            row[-2] += 1
            row[-1] += value

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._values.items())
        out = self.header()
        for k, row in items:
            for b, c in zip(self.buckets, row):
                le = 'le="' + _num(b) + '"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, k, le)} {_num(c)}")
            inf = 'le="+Inf"'
            out.append(f"{self.name}_bucket{_labels(self.label_names, k, inf)} {_num(row[-2])}")
            out.append(f"{self.name}_sum{_labels(self.label_names, k)} {_num(row[-1])}")
            out.append(f"{self.name}_count{_labels(self.label_names, k)} {_num(row[-2])}")
        return out


class Registry:
    """The instruments of one server and the collectors that fill its state gauges."""

    def __init__(self) -> None:
        self.metrics: list[_Metric] = []
        self.collectors: list[Callable[[], None]] = []

    def add(self, metric: _Metric) -> _Metric:
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        for collect in self.collectors:
            collect()
        lines: list[str] = []
        for m in self.metrics:
            lines += m.render()  # type: ignore[attr-defined]
        return "\n".join(lines) + "\n"


class ServeMetrics:
    """Every metric ``mukv serve`` exports (see docs/serve.md for the list)."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        s = ("stream",)
        self.received = r.add(Counter("mukv_frames_received_total", "Frames received (pushed or pulled) per stream.", s))
        self.stored = r.add(Counter("mukv_frames_stored_total", "Frames ingested and stored per stream.", s))
        self.dropped = r.add(Counter("mukv_frames_dropped_total",
                                     "Frames dropped per stream (waited longer than max_lag_s, or queue full).", s))
        self.lag = r.add(Gauge("mukv_stream_lag_seconds", "Seconds the oldest waiting frame of a stream has waited.", s))
        self.queue_frames = r.add(Gauge("mukv_queue_frames", "Frames waiting for ingest per stream.", s))
        self.queue_bytes = r.add(Gauge("mukv_queue_bytes", "Bytes of frames waiting for ingest per stream.", s))
        self.hot_bytes = r.add(Gauge("mukv_hot_bytes", "Bytes of a stream's hot tier in use.", s))
        self.disk_bytes = r.add(Gauge("mukv_disk_bytes", "KV bytes of a stream on disk.", s))
        self.stream_frames = r.add(Gauge("mukv_stream_frames", "Frames stored in a stream.", s))
        self.streams = r.add(Gauge("mukv_streams", "Streams held, by role (writer: ingested here; reader).", ("role",)))
        self.questions_waiting = r.add(Gauge("mukv_questions_waiting", "Questions waiting for the engine."))
        self.batch = r.add(Histogram("mukv_ingest_batch_frames", "Frames per ingest step.", BATCH_BUCKETS))
        self.step_seconds = r.add(Histogram("mukv_ingest_step_seconds", "Seconds per ingest step.", LATENCY_BUCKETS))
        self.question_seconds = r.add(Histogram(
            "mukv_question_seconds", "Question latency from arrival: first token and whole answer.", LATENCY_BUCKETS,
            ("stage",)))
        self.questions = r.add(Counter("mukv_questions_total", "Questions by outcome (ok, error).", ("outcome",)))
        self.gaps = r.add(Counter("mukv_gaps_total", "Gaps (runs of dropped frames) recorded per stream.", s))

    def forget_stream(self, stream_id: str) -> None:
        for m in (self.lag, self.queue_frames, self.queue_bytes, self.hot_bytes, self.disk_bytes, self.stream_frames,
                  self.received, self.stored, self.dropped, self.gaps):
            m.remove(stream_id)

    def render(self) -> str:
        return self.registry.render()
