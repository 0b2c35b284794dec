"""Server metrics in the Prometheus text format (no client library needed for these few series)."""

from __future__ import annotations

import threading
from collections import Counter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.n = tuple(buckets), [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.n += 1
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}', f"{name}_sum{{{labels}}} {self.sum:.6f}",
                f"{name}_count{{{labels}}} {self.n}"]
        return out


class ServerMetrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: Counter = Counter()      # (endpoint, status)
        self.errors: Counter = Counter()        # (endpoint, kind)
        self.latency: dict[str, Histogram] = {}
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.queue_wait = Histogram(LATENCY_BUCKETS)

    def observe_request(self, endpoint: str, status: int, seconds: float, error_kind: str | None = None) -> None:
        with self.lock:
            self.requests[endpoint, status] += 1
            if error_kind:
                self.errors[endpoint, error_kind] += 1
            self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, size: int, waits: list[float]) -> None:
        with self.lock:
            self.batch_size.observe(size)
            for w in waits:
                self.queue_wait.observe(w)

    def render(self) -> str:
        with self.lock:
            lines = ["# HELP coca_requests_total Requests by endpoint and HTTP status.",
                     "# TYPE coca_requests_total counter"]
            lines += [f'coca_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())]
            lines += ["# HELP coca_errors_total Failed requests by endpoint and error kind.",
                      "# TYPE coca_errors_total counter"]
            lines += [f'coca_errors_total{{endpoint="{e}",kind="{k}"}} {n}' for (e, k), n in sorted(self.errors.items())]
            lines += ["# HELP coca_request_seconds Request latency.", "# TYPE coca_request_seconds histogram"]
            for e, h in sorted(self.latency.items()):
                lines += h.lines("coca_request_seconds", f'endpoint="{e}"')
            lines += ["# HELP coca_batch_size Caption requests per generate call.", "# TYPE coca_batch_size histogram"]
            lines += self.batch_size.lines("coca_batch_size")
            lines += ["# HELP coca_queue_wait_seconds Time a caption request waited for its batch.",
                      "# TYPE coca_queue_wait_seconds histogram"]
            lines += self.queue_wait.lines("coca_queue_wait_seconds")
            return "\n".join(lines) + "\n"
