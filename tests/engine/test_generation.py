"""rCM sampler, request validation, tiny generation and the warm model cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.cache import ModelCache
from engine.config import TINY_SIZES, WAN_SIZES, WanConfig
from engine.errors import ModelMemoryError, RequestError
from engine.family import Engine
from engine.registry import MODELS
from engine.requests import GenerationRequest, I2VRequest, T2VRequest
from engine.sampler import rcm_sample, rcm_timesteps
from engine.settings import EngineSettings

TINY = WanConfig.from_name("tiny-t2v")


def test_rcm_timesteps_at_sigma_max_80():
    assert [round(t, 4) for t in rcm_timesteps(80.0, 4)] == [0.9877, 0.9338, 0.8529, 0.6090, 0.0]
    assert [round(t, 4) for t in rcm_timesteps(80.0, 2)] == [0.9877, 0.9338, 0.0]
    # Independent check of the TrigFlow → rectified-flow map: t = tan(a) / (1 + tan(a)).
    assert rcm_timesteps(200.0, 1)[0] == pytest.approx(200 / 201)


def test_sampler_is_x0_prediction_with_fresh_noise():
    """With a velocity field that is exact for a known x0, every step lands on x0."""
    x0 = torch.full((1, 2, 1, 2, 2), 0.25, dtype=torch.float64)
    seen: list[float] = []

    def velocity(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        t = timestep[0].item() / 1000
        seen.append(t)
        # x = (1-t)·x0 + t·ε  ⇒  v = ε − x0 = (x − x0)/t
        return (x - x0) / t

    for ode in (False, True):
        seen.clear()
        out = rcm_sample(velocity, x0.shape, sigma_max=80.0, num_steps=4,
                         generator=torch.Generator().manual_seed(0), device=torch.device("cpu"), ode=ode)
        assert torch.allclose(out, x0) and out.dtype == torch.float64
        assert seen == pytest.approx(rcm_timesteps(80.0, 4)[:4])


class _Tiny:
    """The tiny pipeline behind an Engine of its own, called like a pipeline."""

    def __init__(self) -> None:
        self.engine = Engine(EngineSettings())
        self.spec = self.engine.load_spec("tiny-t2v")

    def generate(self, request: GenerationRequest):
        return self.engine.generate(self.spec, request)


@pytest.fixture(scope="module")
def tiny():
    return _Tiny()


def test_same_seed_same_frames_other_seed_other_frames(tiny):
    a = tiny.generate(T2VRequest("a red fox", num_frames=5, seed=7))
    b = tiny.generate(T2VRequest("a red fox", num_frames=5, seed=7))
    c = tiny.generate(T2VRequest("a red fox", num_frames=5, seed=8))
    assert np.array_equal(a.frames, b.frames)
    assert not np.array_equal(a.frames, c.frames)


@pytest.mark.parametrize("resolution, aspect, frames", [
    ("480p", "16:9", 1), ("480p", "9:16", 5), ("720p", "1:1", 9), ("480p", "4:3", 17)])
def test_output_has_requested_shape_and_dtype(tiny, resolution, aspect, frames):
    r = tiny.generate(T2VRequest("x", resolution=resolution, aspect_ratio=aspect,
                                        num_frames=frames, num_steps=2))
    w, h = TINY_SIZES[resolution][aspect]
    assert r.frames.shape == (frames, h, w, 3) and r.frames.dtype == np.uint8
    assert (r.width, r.height, r.num_frames, r.fps) == (w, h, frames, 16)
    assert set(r.timings) == {"text_s", "denoise_s", "vae_s", "total_s"}
    assert r.frames.std() > 0      # every frame written, not a blank buffer


def test_real_presets_use_turbodiffusion_sizes():
    assert WanConfig.from_name("wan2.1-t2v-1.3b").size("480p", "16:9") == (832, 480)
    assert WanConfig.from_name("wan2.1-t2v-14b").size("720p", "9:16") == (720, 1280)
    assert all(w % 16 == 0 and h % 16 == 0 for t in (WAN_SIZES, TINY_SIZES)
               for sizes in t.values() for w, h in sizes.values())


@pytest.mark.parametrize("field, value, allowed", [
    ("num_frames", 80, "4k+1"), ("num_frames", 129, "125"), ("num_frames", "many", "integer"),
    ("num_steps", 5, "1, 2, 3 or 4"), ("num_steps", 0, "1, 2, 3 or 4"),
    ("resolution", "1080p", "480p | 720p"), ("aspect_ratio", "21:9", "16:9"),
    ("attention_type", "flash", "original | sla | sagesla | auto"), ("sla_topk", 1.5, "(0, 1]"),
    ("sla_topk", 0, "(0, 1]"), ("sigma_max", -1, "positive"), ("sigma_max", math.inf, "positive"),
    ("seed", -3, "[0, 2^63)"), ("seed", True, "integer"), ("quant_linear", "int4", "auto | true | false"),
    ("prompt", "  ", "non-empty"), ("sampler", "euler", "sde | ode"),
])
def test_bad_request_values_name_field_and_allowed_values(field, value, allowed):
    with pytest.raises(RequestError) as err:
        GenerationRequest(**{"prompt": "x", field: value}).validated(TINY)
    assert err.value.field == field and allowed in str(err.value) and field in str(err.value)


def test_unknown_model_lists_presets():
    with pytest.raises(RequestError, match="tiny-t2v") as err:
        WanConfig.from_name("wan9")
    assert all(name in str(err.value) for name in MODELS)


def test_random_weights_for_real_presets_need_the_benchmark_switch():
    with pytest.raises(RequestError, match="TURBO_ALLOW_RANDOM_WEIGHTS"):
        Engine(EngineSettings(), random_weights=True).load_spec("wan2.1-t2v-14b")
    allowed = Engine(EngineSettings(allow_random_weights=True), random_weights=True)
    assert allowed.load_spec("wan2.1-t2v-14b").files.random


def test_model_cache_is_lru_within_a_budget():
    cache: ModelCache[str] = ModelCache(budget_bytes=100)
    assert cache.get("a", lambda: "A", nbytes=40, name="a") == "A"
    assert cache.get("b", lambda: "B", nbytes=40, name="b") == "B"
    assert cache.get("a", lambda: pytest.fail("reloaded"), nbytes=40, name="a") == "A"
    cache.get("c", lambda: "C", nbytes=40, name="c")       # evicts b, the least recently used
    assert cache.keys() == ["a", "c"] and cache.loads == 3
    with pytest.raises(ModelMemoryError, match=r"model huge needs about .* VRAM budget"):
        cache.get("huge", lambda: "H", nbytes=101, name="huge")


def test_rows_differing_only_in_attention_share_one_load_and_differ_in_output():
    """Top-k and the backend are per request: one loaded model, different videos."""
    engine = Engine(EngineSettings())
    spec = engine.load_spec("tiny-t2v")
    # 720p 16:9 at 33 frames: 9 latent frames x 60 tokens = 540 tokens, 9 key blocks of 64,
    # so top-k 0.1 keeps 1 block per query block and 0.5 keeps 4.
    base = dict(prompt="a boat", resolution="720p", num_frames=33, num_steps=1, seed=3)
    narrow = engine.generate(spec, T2VRequest(**base, attention_type="sla", sla_topk=0.1))
    wide = engine.generate(spec, T2VRequest(**base, attention_type="sla", sla_topk=0.5))
    dense = engine.generate(spec, T2VRequest(**base, attention_type="original"))
    again = engine.generate(spec, T2VRequest(**base, attention_type="sla", sla_topk=0.1))
    assert engine.cache.loads == 1 and len(engine.cache.keys()) == 1
    assert not np.array_equal(narrow.frames, wide.frames)
    assert not np.array_equal(narrow.frames, dense.frames)
    assert np.array_equal(narrow.frames, again.frames)          # settings restored exactly
    assert (narrow.attention_type, dense.attention_type) == ("sla", "original")


def test_cache_key_has_the_device_index_and_no_request_settings():
    from engine.family import LoadSpec
    spec = Engine(EngineSettings()).load_spec("tiny-t2v")
    on0 = LoadSpec(model=spec.model, files=spec.files, device=torch.device("cuda", 0), dtype=torch.bfloat16)
    on1 = LoadSpec(model=spec.model, files=spec.files, device=torch.device("cuda", 1), dtype=torch.bfloat16)
    assert on0.cache_key() != on1.cache_key()
    assert "cuda:1" in on1.cache_key() and "cuda:0" in on0.cache_key()
    assert on0.cache_key() == LoadSpec(model=spec.model, files=spec.files, device=torch.device("cuda", 0),
                                       dtype=torch.bfloat16).cache_key()


def test_cuda_without_index_resolves_to_the_current_device():
    from engine.family import resolve_device
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda").index == torch.cuda.current_device()


def test_a_t2v_model_refuses_an_image_request(tiny):
    with pytest.raises(TypeError, match="T2VRequest"):
        tiny.generate(I2VRequest("x", image="/tmp/a.png", num_frames=5))


def test_engines_share_nothing():
    a, b = Engine(EngineSettings()), Engine(EngineSettings())
    pa = a.pipeline(a.load_spec("tiny-t2v"))
    pb = b.pipeline(b.load_spec("tiny-t2v"))
    assert pa is not pb and a.cache.loads == b.cache.loads == 1
