"""The server's Prometheus metrics (text exposition format 0.0.4), with no client library: counters of requests by
endpoint and status and of tokens, histograms of time to first token and per-token latency, and gauges read at
scrape time (queue depth, KV-cache use)."""
from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from typing import Callable

PREFIX = "dynfocus"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    def __init__(self, buckets: tuple):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.buckets):
            self.counts[index] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self, gauges: Callable[[], dict]):
        self._lock = threading.Lock()
        self._gauges = gauges
        self.requests: dict = defaultdict(int)          # (endpoint, status code) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)

    def request_done(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def tokens(self, prompt: int, generated: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.generation_tokens += generated

    def latency(self, ttft_s: float | None, per_token_s: float | None) -> None:
        with self._lock:
            if ttft_s is not None:
                self.ttft.observe(ttft_s)
            if per_token_s is not None:
                self.tpot.observe(per_token_s)

    def render(self) -> str:
        with self._lock:
            lines = [f"# HELP {PREFIX}_requests_total Finished HTTP requests by endpoint and status code.",
                     f"# TYPE {PREFIX}_requests_total counter"]
            lines += [f'{PREFIX}_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}'
                      for (endpoint, status), count in sorted(self.requests.items())]
            for name, value, text in (("prompt_tokens_total", self.prompt_tokens, "Prompt tokens processed."),
                                      ("generation_tokens_total", self.generation_tokens, "Tokens generated.")):
                lines += [f"# HELP {PREFIX}_{name} {text}", f"# TYPE {PREFIX}_{name} counter",
                          f"{PREFIX}_{name} {value}"]
            for name, histogram, text in (
                    ("time_to_first_token_seconds", self.ttft, "Time from request to its first token."),
                    ("time_per_output_token_seconds", self.tpot, "Mean time per token after the first.")):
                lines += [f"# HELP {PREFIX}_{name} {text}", f"# TYPE {PREFIX}_{name} histogram"]
                lines += histogram.lines(f"{PREFIX}_{name}")
        for name, (value, text) in self._gauges().items():
            lines += [f"# HELP {PREFIX}_{name} {text}", f"# TYPE {PREFIX}_{name} gauge", f"{PREFIX}_{name} {value}"]
        return "\n".join(lines) + "\n"
