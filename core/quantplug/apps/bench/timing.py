"""Timing: a median-of-trials timer (CUDA events or the host clock) and CUDA-graph capture."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence


def capture_graph(fn: Callable[[], object], repeat: int = 1):
    """``fn`` warmed up three times on a side stream (Triton compiles, allocations, lazy caches),
    then ``repeat`` calls of it captured in one CUDA graph, which is returned."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            fn()
    return graph


class Timer:
    """Median time per call of ``fn`` in microseconds, on ``device``."""

    def __init__(self, device: str, quick: bool):
        import torch

        self.torch = torch
        self.cuda = device == "cuda"
        self.trials = 5 if quick else 15
        self.trial_ms = 1.0 if quick else 3.0

    def _sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def _elapsed_ms(self, body: Callable[[], None]) -> float:
        if self.cuda:
            start = self.torch.cuda.Event(enable_timing=True)
            end = self.torch.cuda.Event(enable_timing=True)
            start.record()
            body()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        start = time.perf_counter()
        body()
        return (time.perf_counter() - start) * 1e3

    def eager(self, fns: Sequence[Callable[[], object]]) -> float:
        def one_pass():
            for fn in fns:
                fn()

        for _ in range(3):
            one_pass()
        self._sync()
        first = self._elapsed_ms(one_pass)
        inner = max(1, min(500, math.ceil(self.trial_ms / max(first, 1e-3))))

        def body():
            for _ in range(inner):
                one_pass()

        times = [self._elapsed_ms(body) / (inner * len(fns)) for _ in range(self.trials)]
        return statistics.median(times) * 1e3

    def graph(self, fns: Sequence[Callable[[], object]]) -> float | None:
        """The same calls captured once in a CUDA graph and replayed (``None`` if capture fails)."""
        if not self.cuda:
            return None
        torch = self.torch
        repeat = max(1, 32 // len(fns))
        try:
            graph = capture_graph(lambda: [fn() for fn in fns], repeat)
        except Exception as exc:  # a base that cannot be captured: say so in the row
            self.last_graph_error = f"{type(exc).__name__}: {str(exc)[:160]}"
            torch.cuda.synchronize()
            return None
        calls = repeat * len(fns)
        graph.replay()
        torch.cuda.synchronize()
        first = self._elapsed_ms(graph.replay)
        inner = max(1, min(200, math.ceil(self.trial_ms / max(first, 1e-3))))

        def body():
            for _ in range(inner):
                graph.replay()

        times = [self._elapsed_ms(body) / (inner * calls) for _ in range(self.trials)]
        return statistics.median(times) * 1e3
