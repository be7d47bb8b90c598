"""Strict, offline checkpoint loading.

Files come from a local folder under TurboDiffusion's own names (or explicit paths); nothing is
ever fetched. A module is built on the `meta` device, its expected keys and shapes are compared
with the file's, and on a match the file's tensors are assigned in place (`assign=True`), so the
weights are never materialised twice: `.pth` files are memory-mapped (`torch.load(mmap=True)`),
`.safetensors` through `safe_open`, and each tensor is copied once, straight to the target device.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError

__all__ = ["build_random", "cast_floating", "check_keys", "file_identity", "finish_load",
           "load_module", "prefetch_file", "read_state_dict", "to_device_in_file_order"]

log = logging.getLogger(__name__)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The flat {key: tensor} dict of a `.pth` or `.safetensors` file, memory-mapped on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found (put it in the checkpoints folder "
                                    "or pass an explicit path)")
    prefetch_file(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # Legacy (non-zip) torch.save format cannot be memory-mapped.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # corrupt or foreign file: say which one
        raise CheckpointError(path, f"cannot be read as a checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(path, "is not a flat {name: tensor} state dict")
    return dict(state)


def prefetch_file(path: Path, chunk: int = 32 << 20) -> threading.Thread:
    """Stream the file into the page cache in the background, in large sequential reads.

    Memory-mapped tensors are otherwise faulted in a few pages at a time as they are copied to
    the device, which measured 3.4× slower than one sequential read of a cold 2.8 GB file. The
    buffer is reused, so no second copy of the weights is held.
    """
    def run() -> None:
        buf = bytearray(chunk)
        try:
            with path.open("rb", buffering=0) as f:
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                while f.readinto(buf):
                    pass
        except OSError as e:  # prefetch is an optimisation; the real read reports errors
            log.debug("prefetch of %s stopped: %s", path, e)

    t = threading.Thread(target=run, name=f"prefetch-{path.name}", daemon=True)
    t.start()
    return t


def check_keys(module: nn.Module, state: Mapping[str, torch.Tensor], path: object) -> None:
    """Raise CheckpointError listing missing, unexpected and wrong-shaped keys."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} file {list(state[k].shape)} vs model {list(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(path, "keys do not match the model", missing=missing,
                              unexpected=unexpected, mismatched=mismatched)


def load_module(
    build: Callable[[], nn.Module],
    path: str | os.PathLike[str],
    *,
    device: torch.device,
    dtype: torch.dtype,
    state: Mapping[str, torch.Tensor] | None = None,
    convert: Callable[[nn.Module], object] | None = None,
    timings: dict[str, float] | None = None,
) -> nn.Module:
    """Build on meta, check keys strictly, assign the file's tensors, move to device and dtype.

    `convert` runs on the device before the dtype cast (int8 dequantisation wants fp32 scales).
    Floating tensors are cast to `dtype`, except in modules that set `keep_dtype = True`
    (int8 kernels keep float32 scales); integer buffers keep theirs. `timings` receives the
    seconds of each phase (read, build, copy, convert).
    """
    clock = _PhaseClock(timings)
    if state is None:
        state = read_state_dict(path)
    clock("read_s")
    with torch.device("meta"):
        module = build()
    check_keys(module, state, path)
    clock("build_s")
    module.load_state_dict(to_device_in_file_order(state, device), strict=True, assign=True)
    clock("copy_s")
    if convert is not None:
        convert(module)
    cast_floating(module, dtype)
    finish_load(module)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    clock("convert_s")
    return module.eval().requires_grad_(False)


def to_device_in_file_order(state: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Copy memory-mapped tensors to the device in the order they lie in the file.

    Sequential page faults let the kernel's readahead stream the file; the module's own order
    (children before parents) jumps around it and measured several times slower on a cold file.
    """
    if device.type == "cpu":
        return dict(state)
    order = sorted(state, key=lambda k: state[k].untyped_storage().data_ptr() + state[k].storage_offset()
                   * state[k].element_size())
    moved = {k: state[k].to(device) for k in order}
    return {k: moved[k] for k in state}


class _PhaseClock:
    def __init__(self, sink: dict[str, float] | None):
        self.sink, self.t = sink, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        if self.sink is not None:
            self.sink[name] = now - self.t
        self.t = now


def cast_floating(module: nn.Module, dtype: torch.dtype) -> None:
    for m in module.modules():
        if getattr(m, "keep_dtype", False):
            continue
        for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if t is not None and t.is_floating_point() and t.dtype != dtype:
                if isinstance(t, nn.Parameter):
                    setattr(m, name, nn.Parameter(t.to(dtype), requires_grad=False))
                else:
                    m._buffers[name] = t.to(dtype)


def build_random(build: Callable[[], nn.Module], *, seed: int, device: torch.device,
                 dtype: torch.dtype) -> nn.Module:
    """Seeded random weights through the same classes (tiny preset, benchmarks).

    Built directly on the device in the target dtype: a 14B model built in float32 on the host
    would need 57 GB of RAM and minutes of CPU init.
    """
    prev = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                module = build()
        finally:
            torch.set_default_dtype(prev)
    cast_floating(module, dtype)
    finish_load(module)
    return module.eval().requires_grad_(False)


def finish_load(module: nn.Module) -> None:
    """Let modules rebuild derived, non-persistent tables after weights arrived (`after_load`)."""
    for m in module.modules():
        hook = getattr(m, "after_load", None)
        if callable(hook):
            hook()


def file_identity(path: str | os.PathLike[str]) -> str:
    """Cheap identity of a checkpoint file: name, size and modification time (no full read)."""
    p = Path(path)
    st = p.stat()
    return f"{p.name}:{st.st_size}:{st.st_mtime_ns}"
