"""A module's weights parked in host memory, and brought back to the GPU fast.

`HostCopy` keeps every parameter and buffer of a module in ONE host buffer, page-locked with
`cudaHostRegister` (exact size). PyTorch's pinned allocator would round each allocation up to a
power of two — a 28.6 GB expert would take 32 GB or more — and pinning 1,175 tensors one by one
is slow. Weights never change, so after the first copy, moving a module out is free: its tensors
point back at their host views and the GPU memory goes back to the caching allocator. Moving it in
copies the views to freshly allocated GPU tensors, optionally on a side stream with one event per
group (see engine/experts.py, which streams an expert block by block beside its forward).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["HostCopy"]

log = logging.getLogger(__name__)

_ALIGN = 256          # bytes: every tensor's view starts aligned (any dtype, DMA-friendly)


class HostCopy:
    """The tensors of `module` in host memory, grouped (a forward's order: group 0 first)."""

    def __init__(self, module: nn.Module, groups: Sequence[Sequence[nn.Module]] | None = None, *,
                 pin: bool):
        owners = [list(g) for g in groups] if groups is not None else [list(module.modules())]
        seen: set[int] = set()
        entries: list[list[tuple[nn.Module, str, torch.Tensor]]] = []
        for group in owners:
            items: list[tuple[nn.Module, str, torch.Tensor]] = []
            for owner in group:
                if id(owner) in seen:
                    continue
                seen.add(id(owner))
                for name, t in list(owner._parameters.items()) + list(owner._buffers.items()):
                    if isinstance(t, torch.Tensor):
                        items.append((owner, name, t))
            entries.append(items)
        sizes = [t.numel() * t.element_size() for g in entries for _, _, t in g]
        offsets, total = [], 0
        for size in sizes:
            offsets.append(total)
            total += -(-size // _ALIGN) * _ALIGN
        self.nbytes = total
        self.buffer = torch.empty(max(total, 1), dtype=torch.uint8)
        self.pinned = pin and _register(self.buffer)
        self.groups: list[list[tuple[nn.Module, str, torch.Tensor]]] = []
        index = 0
        for entry in entries:
            views = []
            for owner, name, t in entry:
                size = sizes[index]
                view = self.buffer[offsets[index]:offsets[index] + size].view(t.dtype).view(t.shape)
                view.copy_(t)
                views.append((owner, name, view))
                index += 1
            self.groups.append(views)

    def move_out(self) -> None:
        """Point the module's tensors at their host views (the device copies are released)."""
        for group in self.groups:
            for owner, name, view in group:
                _set_tensor(owner, name, view)

    def move_in(self, device: torch.device, *, stream: torch.cuda.Stream | None = None) -> list[torch.cuda.Event]:
        """Copy the views to new tensors on `device`. With `stream` (CUDA), the copies run on it
        after the work queued so far on the current stream, and one event per group is returned
        (recorded when that group has arrived); without, the copy is finished on return."""
        if device.type != "cuda" or stream is None:
            for group in self.groups:
                for owner, name, view in group:
                    _set_tensor(owner, name, view.to(device, copy=True, non_blocking=self.pinned))
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()
            return []
        compute = torch.cuda.current_stream(device)
        # The memory the other module just released may still be read by queued kernels.
        stream.wait_stream(compute)
        events = []
        for group in self.groups:
            for owner, name, view in group:
                # Allocated for the compute stream (it reuses the blocks just released there).
                target = torch.empty_like(view, device=device)
                with torch.cuda.stream(stream):
                    target.copy_(view, non_blocking=self.pinned)
                target.record_stream(stream)
                _set_tensor(owner, name, target)
            event = torch.cuda.Event()
            event.record(stream)
            events.append(event)
        return events

    def __del__(self) -> None:
        if getattr(self, "pinned", False):
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())


def _register(buffer: torch.Tensor) -> bool:
    """Page-lock the buffer in place; False (pageable copies, slower) when the driver refuses."""
    if not torch.cuda.is_available():
        return False
    err = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
    code = int(getattr(err, "value", err))
    if code != 0:
        log.warning("cudaHostRegister of %.1f GB failed (error %d): host copies stay pageable",
                    buffer.numel() / 1e9, code)
        return False
    return True


def _set_tensor(owner: nn.Module, name: str, tensor: torch.Tensor) -> None:
    param = owner._parameters.get(name)
    if param is not None:
        param.data = tensor          # same Parameter object: compiled code and references stay valid
    else:
        owner._buffers[name] = tensor
