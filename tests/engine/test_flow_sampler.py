"""The dance sampler: Wan's flow sigma grid, UniPC steps, and which guidance branches run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.flow_sampler import FAST, OFFICIAL, Guidance, flow_sigmas, guided_unipc_sample, unipc_scheduler

MIRROR = Path("/work/.mirror/MCG-NJU+SteadyDancer/repo")


def test_timesteps_of_the_official_grid():
    # What SteadyDancer's FlowUniPCMultistepScheduler gives for shift 5 (read off it once).
    assert unipc_scheduler(4, 5.0).timesteps.tolist() == [999, 937, 833, 624]
    sigmas = flow_sigmas(4, 5.0)
    assert sigmas[0] == pytest.approx(5 * 0.999 / (1 + 4 * 0.999)) and np.all(np.diff(sigmas) < 0)


def test_official_guidance_runs_pose_cfg_only_inside_its_window():
    counts = [len(OFFICIAL.branches(i / 40)) for i in range(40)]
    assert counts[:5] == [2] * 5 and counts[5:16] == [3] * 11 and counts[16:] == [2] * 24
    assert sum(counts) == 91
    assert [FAST.branches(i / 4) for i in range(4)] == [["cond"]] * 4


def _fake_model(weights: dict[str, float]):
    calls: list[str] = []

    def predict(branch: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(branch)
        return weights[branch] * x + t.float() / 1000
    return predict, calls


def test_guidance_combines_the_branches_as_the_official_loop():
    noise = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    predict, calls = _fake_model({"cond": 1.0, "null_text": 0.5, "null_pose": 0.8})
    guided = guided_unipc_sample(predict, noise, steps=10, shift=5.0, guidance=OFFICIAL)
    # pose guidance on the steps at fractions 0.2 and 0.3 only
    assert calls.count("cond") == 10 and calls.count("null_text") == 10 and calls.count("null_pose") == 2
    # The combination is linear here: 0.5 + 5·(1 − 0.5) + 1.5·(1 − 0.8) = 3.3 on the pose steps,
    # 3.0 elsewhere; a model that returns those directly gives the same latent.
    def combined(branch: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 3.0 * x + t.float() / 1000
    plain = guided_unipc_sample(combined, noise, steps=10, shift=5.0, guidance=FAST)
    assert not torch.allclose(guided, plain)       # the pose steps differ (3.3 vs 3.0)
    no_pose = guided_unipc_sample(predict, noise, steps=10, shift=5.0,
                                  guidance=Guidance(text_scale=5.0, pose_scale=0.0))
    torch.testing.assert_close(no_pose, plain)


@pytest.mark.skipif(not MIRROR.exists(), reason="needs the SteadyDancer source mirror (a dev-machine check)")
@pytest.mark.parametrize("steps", [4, 40])
def test_matches_steadydancer_flow_unipc(tmp_path, steps):
    source = subprocess.run(["git", f"--git-dir={MIRROR}", "show", "HEAD:wan/utils/fm_solvers_unipc.py"],
                            capture_output=True, text=True, check=True).stdout
    (tmp_path / "fm_solvers_unipc.py").write_text(source)
    sys.path.insert(0, str(tmp_path))
    try:
        from fm_solvers_unipc import FlowUniPCMultistepScheduler
    finally:
        sys.path.remove(str(tmp_path))
    official = FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
    official.set_timesteps(steps, device="cpu", shift=5.0)
    noise = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x = noise.clone()
    for i, t in enumerate(official.timesteps):
        x = official.step(torch.sin(1.3 * x + i), t, x, return_dict=False)[0]
    step = iter(range(steps))
    ours = guided_unipc_sample(lambda b, x, t: torch.sin(1.3 * x + next(step)), noise, steps=steps, shift=5.0,
                               guidance=FAST)
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=0)
