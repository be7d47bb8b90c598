"""Where the two experts of a Wan2.2 A14B model live, by memory policy.

    resident     both experts on the GPU (an 80 GB card holds two bf16 14B experts at 720p)
    swap         one on the GPU, the idle one in pinned host memory; per row each expert is copied
                 in at most once, and the copy streams block by block beside the first forward
                 on the new expert (each block waits only for its own weights)
    sequential   swap's memory, but the shard runs the high-noise steps of a group of rows, then
                 their low-noise steps: each expert comes in once per group, not once per row

An expert loads from its file (or seeded random weights) the first time it is needed, so a
request of one or two steps never loads the low-noise expert. Weights never change, so moving an
expert out costs nothing after the first time: its tensors point back at their host copies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .offload import HostCopy
from .wan_dit import WanDiT

__all__ = ["POLICIES", "ExpertSet", "choose_policy"]

log = logging.getLogger(__name__)

POLICIES = ("resident", "swap", "sequential")
GiB = 2**30


def choose_policy(setting: str, *, budget_bytes: int | None, expert_bytes: int, working_bytes: int,
                  expected_rows: int) -> str:
    """The policy `setting` names, or for "auto": resident when both experts and the working set
    fit the VRAM budget (no budget: the CPU, everything is host memory), else sequential for a
    batch of several rows and swap for a single row."""
    if setting in POLICIES:
        return setting
    if budget_bytes is None or 2 * expert_bytes + working_bytes <= budget_bytes:
        return "resident"
    return "sequential" if expected_rows > 1 else "swap"


@dataclass
class Activation:
    """What bringing an expert in cost: host seconds, and whether a copy streams behind compute."""
    role: str
    host_s: float
    moved: bool                    # weights arrived on the GPU (from the file or host memory)
    streamed: bool = False         # the copy overlaps the next forward (its stall is measured there)


@dataclass
class ExpertSet:
    roles: tuple[str, ...]                         # in sampling order: ("dit_high", "dit_low")
    load: Callable[[str], WanDiT]                  # builds an expert on the device
    policy: str
    device: torch.device
    stream_copies: bool = True                     # overlap host→GPU copies with the forward (CUDA)
    experts: dict[str, WanDiT] = field(default_factory=dict)
    loads: dict[str, int] = field(default_factory=dict)      # times each expert came onto the GPU
    file_loads: dict[str, int] = field(default_factory=dict)  # times each was built from its file
    _host: dict[str, HostCopy] = field(default_factory=dict)
    _on_device: set[str] = field(default_factory=set)
    _copy_stream: torch.cuda.Stream | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"expert policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")

    @property
    def on_device(self) -> set[str]:
        return set(self._on_device)

    def loaded(self) -> list[WanDiT]:
        return list(self.experts.values())

    def activate(self, role: str) -> tuple[WanDiT, Activation]:
        """The expert of `role`, on the GPU, moving the other one out first when the policy says so."""
        t0 = time.perf_counter()
        if role in self._on_device:
            return self.experts[role], Activation(role, 0.0, moved=False)
        if self.policy != "resident":
            for other in list(self._on_device):
                self._move_out(other)
        streamed = False
        if role not in self.experts:
            self.experts[role] = self.load(role)
            self.file_loads[role] = self.file_loads.get(role, 0) + 1
        else:
            streamed = self._move_in(role)
        self._on_device.add(role)
        self.loads[role] = self.loads.get(role, 0) + 1
        return self.experts[role], Activation(role, time.perf_counter() - t0, moved=True, streamed=streamed)

    # -- moving -------------------------------------------------------------------------------
    def _move_out(self, role: str) -> None:
        """Point the expert's tensors at their host copies (made on the first move), freeing the GPU."""
        if role not in self._host:
            expert = self.experts[role]
            # A forward's order: embeddings and head first, then block by block.
            inside = {id(m) for block in expert.blocks for m in block.modules()}
            outside = [m for m in expert.modules() if id(m) not in inside]
            self._host[role] = HostCopy(expert, [outside, *[list(b.modules()) for b in expert.blocks]],
                                        pin=self.device.type == "cuda")
        self._host[role].move_out()
        self._on_device.discard(role)

    def _move_in(self, role: str) -> bool:
        """Copy the expert back from host memory; True when the copy streams behind the next forward."""
        expert, host = self.experts[role], self._host[role]
        if self.device.type != "cuda" or not self.stream_copies:
            host.move_in(self.device)
            return False
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        events = host.move_in(self.device, stream=self._copy_stream)
        compute = torch.cuda.current_stream(self.device)

        def wait_for(group: int) -> None:           # WanDiT calls it before each part's first use
            compute.wait_event(events[group + 1])
        expert.wait_for_weights = wait_for
        return True
