"""rCM few-step sampler, as TurboDiffusion's inference scripts run it.

TrigFlow angles [atan(sigma_max), 1.5, 1.4, 1.0][:steps] (then 0) become rectified-flow times
t = sin(a) / (sin(a) + cos(a)). Each step is one DiT forward (CFG is distilled into the student):
x0 = x - t·v, then SDE re-noising x = (1 - t_next)·x0 + t_next·ε (default) or an Euler ODE step.
The latent state stays float64; the network runs in its own dtype (bf16 on GPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["RcmState", "expert_schedule", "initial_noise", "rcm_sample", "rcm_start", "rcm_step", "rcm_timesteps"]

MID_ANGLES = (1.5, 1.4, 1.0)

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, timestep·1000) -> v


def rcm_timesteps(sigma_max: float, num_steps: int) -> list[float]:
    """Rectified-flow times t_0 > … > t_{n-1} > 0, with the final 0 appended."""
    angles = [math.atan(sigma_max), *MID_ANGLES][:num_steps] + [0.0]
    return [math.sin(a) / (math.sin(a) + math.cos(a)) for a in angles]


def expert_schedule(sigma_max: float, num_steps: int, boundary: float) -> list[str]:
    """Which expert runs each step of a two-expert model (Wan2.2 A14B): "high" until the first
    step whose t_cur is below `boundary`, then "low" for the rest (the switch happens once)."""
    out: list[str] = []
    for t_cur in rcm_timesteps(sigma_max, num_steps)[:-1]:
        out.append("low" if out and out[-1] == "low" or t_cur < boundary else "high")
    return out


def initial_noise(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    # Drawn on the CPU so a seed gives the same video on every device; the latent is small
    # (16×21×60×104 at 480p), so the copy costs nothing next to a DiT forward.
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(torch.float64)


@dataclass
class RcmState:
    """The sampler between steps: a row can pause here (the sequential expert policy runs the
    high-noise steps of several rows, then their low-noise steps) and resume unchanged."""
    x: torch.Tensor                       # current noisy latent (float64)
    x0: torch.Tensor                      # last clean estimate
    ts: list[float]                       # times with the final 0
    generator: torch.Generator            # CPU generator of the fresh SDE noise
    ode: bool = False
    step: int = 0                         # steps done

    @property
    def done(self) -> bool:
        return self.step >= len(self.ts) - 1

    @property
    def t_cur(self) -> float:
        return self.ts[self.step]


def rcm_start(shape: tuple[int, ...], *, sigma_max: float, num_steps: int, generator: torch.Generator,
              device: torch.device, ode: bool = False) -> RcmState:
    ts = rcm_timesteps(sigma_max, num_steps)
    x = initial_noise(shape, generator).to(device) * ts[0]
    return RcmState(x=x, x0=x, ts=ts, generator=generator, ode=ode)


def rcm_step(state: RcmState, velocity: Velocity) -> None:
    """One DiT forward: x0 = x − t·v, then SDE re-noising or the Euler ODE step."""
    t_cur, t_next = state.ts[state.step], state.ts[state.step + 1]
    timestep = torch.full((state.x.shape[0],), t_cur * 1000.0, device=state.x.device)
    v = velocity(state.x, timestep).to(torch.float64)
    state.x0 = state.x - t_cur * v
    if state.ode:
        state.x = state.x - (t_cur - t_next) * v
    else:
        noise = initial_noise(tuple(state.x.shape), state.generator).to(state.x.device)
        state.x = (1.0 - t_next) * state.x0 + t_next * noise
    state.step += 1


def rcm_sample(
    velocity: Velocity,
    shape: tuple[int, ...],
    *,
    sigma_max: float,
    num_steps: int,
    generator: torch.Generator,
    device: torch.device,
    ode: bool = False,
) -> torch.Tensor:
    """Run the sampler and return the final x0 (float64, on `device`)."""
    state = rcm_start(shape, sigma_max=sigma_max, num_steps=num_steps, generator=generator,
                      device=device, ode=ode)
    while not state.done:
        rcm_step(state, velocity)
    return state.x0
