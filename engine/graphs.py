"""A DiT forward as one replayed CUDA graph, per input shape.

A 4-step row launches the whole forward four times with the same shapes; capturing it once lets
each step cost one `graph.replay()` instead of the ~1,000 kernel launches and the Python between
them (regional compile leaves the code between blocks, the RoPE lookup and the time conditioning
in eager mode). PyTorch's own CUDA graphs (`torch.compile(mode="reduce-overhead")`) need the whole
model compiled in one graph; ours keeps regional compile (fast to build) and captures around it.

Capture runs the forward twice on a side stream first (cuDNN/Triton autotuning and the compiled
code's first calls happen there, never inside the capture), then records it once. Inputs are
copied into the graph's static tensors, and the output is copied out, so callers see an ordinary
function. Each shape keeps its own graph and its activations' memory pool: the capture cost (two
warm forwards + one recorded) is paid once per shape, which `WanPipelineBase.prepare` only does
when enough rows follow, like compiling.

Not for a DiT whose weights stream in during the forward (engine/offload.py): its per-block
waits are host-side events.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["GraphedForward"]

log = logging.getLogger(__name__)

Key = tuple[tuple[tuple[int, ...], torch.dtype, torch.device], ...]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    output: torch.Tensor


class GraphedForward:
    """Call like `fn(*tensors)`; on CUDA the first call of each input shape captures a graph."""

    def __init__(self, fn: Callable[..., torch.Tensor], *, warmup: int = 2):
        self.fn, self.warmup = fn, warmup
        self._graphs: dict[Key, _Captured] = {}
        self.capture_s: dict[Key, float] = {}

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        if not all(t.is_cuda for t in tensors):
            return self.fn(*tensors)
        key: Key = tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._graphs[key] = self._capture(key, tensors)
        for static, t in zip(captured.inputs, tensors):
            static.copy_(t)
        captured.graph.replay()
        return captured.output.clone()

    def clear(self) -> None:
        """Drop every graph and its memory pool (a model about to be evicted)."""
        self._graphs.clear()

    def _capture(self, key: Key, tensors: tuple[torch.Tensor, ...]) -> _Captured:
        t0 = time.perf_counter()
        inputs = [t.clone() for t in tensors]
        side = torch.cuda.Stream(device=inputs[0].device)
        side.wait_stream(torch.cuda.current_stream(inputs[0].device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*inputs)
        torch.cuda.current_stream(inputs[0].device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.fn(*inputs)
        torch.cuda.synchronize(inputs[0].device)
        self.capture_s[key] = time.perf_counter() - t0
        log.info("captured a CUDA graph of the DiT forward for %s in %.1f s",
                 [k[0] for k in key], self.capture_s[key])
        return _Captured(graph, inputs, output)
