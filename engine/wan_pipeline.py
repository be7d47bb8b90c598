"""What every Wan pipeline shares: its DiT loader, the Wan VAE, the lazily loaded umT5 encoder with
the embedding cache, the compile decision and the CUDA out-of-memory answer.

The modes' pipelines (engine/t2v.py, engine/i2v.py) subclass `WanPipelineBase` and add their
DiT(s) and their `generate()`. The umT5 encoder loads only for prompts missing from the embedding
cache, and is parked in page-locked host memory after encoding on presets of 5B+ parameters.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from . import loading
from .attention import AttentionSpec, resolve_attention
from .digest import file_digest
from .errors import CheckpointError, ModelMemoryError
from .family import WEIGHT_SEED, EmbeddingStore, LoadSpec
from .int8 import convert_int8_for_runtime, swap_block_linears_for_int8
from .offload import HostCopy
from .settings import EngineSettings
from .umt5 import HashTokenizer, TextEncoder, UMT5Encoder, load_tokenizer
from .wan_dit import WanDiT, adapt_checkpoint
from .wan_vae import WanVAE

if TYPE_CHECKING:
    from .vae_speed import FastDecoder

__all__ = ["WanPipelineBase", "memory_errors", "prepare_vae_for_device", "sync"]

log = logging.getLogger(__name__)

# Seed offsets of the random-weight parts (a DiT role not listed gets one from its position).
_SEED_OFFSETS = {"dit": 0, "vae": 1, "text_encoder": 2, "dit_high": 0, "dit_low": 3}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class WanPipelineBase:
    build_attention = "auto"      # the backend the DiT is built with (dance: dense, never SLA)

    def __init__(self, load_spec: LoadSpec, settings: EngineSettings, *,
                 embedding_cache: EmbeddingStore | None = None,
                 offload_text_encoder: bool | None = None):
        self.load_spec, self.settings = load_spec, settings
        self.config = load_spec.model.config
        self.files, self.device, self.dtype = load_spec.files, load_spec.device, load_spec.dtype
        # The build-time backend: the kernels are built whenever installed, whatever the request.
        self.attention = AttentionSpec(type=resolve_attention(self.build_attention, self.device))
        self.embedding_cache = embedding_cache
        self.offload_text_encoder = (self.config.param_billions >= 5) if offload_text_encoder is None \
            else offload_text_encoder
        self._text_encoder: TextEncoder | None = None
        self._text_host: HostCopy | None = None
        self._text_on_device = False
        self.text_encoder_loads = 0
        self.compiled = False
        self.vae = self._load_vae()
        self.decoder: WanVAE | FastDecoder = self.vae       # FastDecoder once prepare() compiles

    # -- loading -------------------------------------------------------------------------------
    def load_dit(self, role: str) -> tuple[WanDiT, str]:
        """The DiT of `role` on the pipeline's device, and its int8 path ("none", "bf16", …)."""
        cfg, spec = self.config, self.attention
        path = self.files.get(role)
        if path is None:
            seed = WEIGHT_SEED + _SEED_OFFSETS.get(role, 10 + self.load_spec.model.dits.index(role))
            dit = cast(WanDiT, loading.build_random(lambda: WanDiT(cfg, spec), seed=seed,
                                                    device=self.device, dtype=self.dtype))
            return dit, self._to_fp8(dit) or "bf16"
        if self.load_spec.fp8:
            cached = self._load_fp8_cache(path)
            if cached is not None:
                return cached
        state = adapt_checkpoint(loading.read_state_dict(path))
        quantized = any(k.endswith(".int8_weight") for k in state)

        def build() -> WanDiT:
            model = WanDiT(cfg, spec)
            if quantized:
                swap_block_linears_for_int8(model)
            return model

        int8_path = ["none"]

        def convert(model: torch.nn.Module) -> None:
            if quantized:
                int8_path[0] = convert_int8_for_runtime(model, self.device,
                                                        prefer_int8_kernels=self.load_spec.int8_kernels)

        dit = cast(WanDiT, loading.load_module(build, path, device=self.device, dtype=self.dtype,
                                               state=state, convert=convert))
        fp8_path = self._to_fp8(dit)
        if fp8_path is not None:
            from . import fp8
            fp8.save_cache(dit, path, file_digest(path, self.settings.digest_cache_dir), self.settings.fp8_cache_dir)
        return dit, fp8_path or int8_path[0]

    def _to_fp8(self, dit: WanDiT) -> str | None:
        """quant_linear=fp8: the block linears become e4m3 (from the bf16 weights just loaded)."""
        if not self.load_spec.fp8:
            return None
        from .fp8 import quantize_model
        return quantize_model(dit, self.device)

    def _load_fp8_cache(self, path: Path) -> tuple[WanDiT, str] | None:
        """The FP8 copy of `path` converted by an earlier load (engine/fp8.py), read instead of the
        bf16 file: half the bytes and no conversion. None when there is none yet."""
        from . import fp8
        cached = fp8.find_cache(path, file_digest(path, self.settings.digest_cache_dir), self.settings.fp8_cache_dir)
        if cached is None:
            return None
        cfg, spec, device = self.config, self.attention, self.device
        fp8_path = ["fp8"]

        def build() -> WanDiT:
            model = WanDiT(cfg, spec)
            fp8_path[0] = fp8.quantize_model(model, device)
            return model

        try:
            dit = cast(WanDiT, loading.load_module(build, cached, device=device, dtype=self.dtype))
        except CheckpointError as e:       # a damaged or foreign copy: convert again from the bf16 file
            log.warning("quant_linear=fp8: ignoring the cached copy %s (%s)", cached, e)
            return None
        log.info("quant_linear=fp8: loaded the converted weights of %s from %s", path.name, cached)
        return dit, fp8_path[0]

    def _build(self, make: Callable[[], torch.nn.Module], path: Path | None, role: str):
        """From the file when there is one, else seeded random weights through the same class."""
        if path is None:
            return loading.build_random(make, seed=WEIGHT_SEED + _SEED_OFFSETS[role], device=self.device,
                                        dtype=self.dtype)
        return loading.load_module(make, path, device=self.device, dtype=self.dtype)

    def _load_vae(self) -> WanVAE:
        vcfg = self.config.vae
        return prepare_vae_for_device(self._build(lambda: WanVAE(vcfg), self.files.get("vae"), "vae"))

    def _load_text_encoder(self) -> TextEncoder:
        ucfg = self.config.umt5
        encoder = self._build(lambda: UMT5Encoder(ucfg), self.files.get("text_encoder"), "text_encoder")
        folder = self.files.get("tokenizer")
        tokenizer = load_tokenizer(folder) if folder else HashTokenizer(ucfg.vocab_size)
        self.text_encoder_loads += 1
        return TextEncoder(encoder, tokenizer, self.config.text_len)

    @property
    def text_encoder_id(self) -> str:
        path = self.files.get("text_encoder")
        if path is None:
            return f"{self.config.name}:random:{WEIGHT_SEED + 2}"
        return loading.file_identity(path) + ":" + str(self.files.get("tokenizer"))

    def wants_compile(self, expected_rows: int) -> bool:
        """Compile the DiT's blocks when enough rows will run to pay for it.

        Regional compile costs about 16 s at 1.3B-480p on an H100 (the first row of each shape)
        and saves roughly a quarter of each denoise; on a 5-row shard it is a net loss (measured
        with bench/pools.py). TURBO_COMPILE=1 forces it, 0 disables it; by default it runs when
        at least TURBO_COMPILE_MIN_ROWS rows (30, or 8 for presets of 5B+ parameters) are coming.
        """
        mode = self.settings.compile
        if self.compiled or self.device.type != "cuda" or mode == "0":
            return False
        default_min = 8 if self.config.param_billions >= 5 else 30
        min_rows = self.settings.compile_min_rows or default_min
        return mode == "1" or expected_rows >= min_rows

    def needs_prepare(self, expected_rows: int) -> bool:
        """prepare() only ever compiles, once."""
        return self.wants_compile(expected_rows)

    def loaded_dits(self) -> list[torch.nn.Module]:
        """The DiTs on this pipeline (t2v and dance: one; i2v overrides with its experts)."""
        return [self.dit]     # type: ignore[attr-defined]

    def prepare(self, expected_rows: int) -> None:
        """Compile the DiTs' blocks, and the VAE's steady-state decoder step, when enough rows
        follow (wants_compile). The compiled decode measured 1.5× the eager one on an H200
        (docs/BENCHMARKS.md, vae; mean 0.8/255 from the eager frames); CUDA graphs and time-tap
        convolutions did not pay (engine/vae_speed.py, docs/DESIGN.md)."""
        if self.wants_compile(expected_rows):
            for dit in self.loaded_dits():
                dit.compile_blocks()     # type: ignore[operator]
            from .vae_speed import DecodeSettings, FastDecoder
            self.decoder = FastDecoder(self.vae, DecodeSettings(compile=True))
            self.compiled = True

    def decode_to_uint8(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> uint8 frames on the host, through the compiled decoder once prepared."""
        return self.decoder.decode_to_uint8(latents)

    def rows_per_group(self, expected_rows: int) -> int:
        return 1

    # -- text --------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[list[torch.Tensor], list[list[str]], list[bool]]:
        """Embeddings [text_len, dim] per prompt, their warnings, and whether each hit the cache."""
        out: list[torch.Tensor | None] = [None] * len(prompts)
        hits = [False] * len(prompts)
        warns: list[list[str]] = [[] for _ in prompts]
        todo: list[int] = []
        for i, p in enumerate(prompts):
            cached = self.embedding_cache.get(self.text_encoder_id, p) if self.embedding_cache else None
            if cached is not None:
                out[i], hits[i] = cached, True
            else:
                todo.append(i)
        if todo:
            if self._text_encoder is None:
                self._text_encoder = self._load_text_encoder()
            elif self._text_host is not None and not self._text_on_device:
                self._text_host.move_in(self.device)
            self._text_on_device = True
            for i in todo:
                emb, w = self._text_encoder.encode([prompts[i]])
                embedding = emb[0].detach()
                out[i], warns[i] = embedding, list(w)
                if self.embedding_cache is not None:
                    self.embedding_cache.put(self.text_encoder_id, prompts[i], embedding.cpu())
            if self.offload_text_encoder and self.device.type == "cuda":
                # Parked in page-locked host memory: the next prompt brings it back at copy speed
                # (11.4 GB for umT5-XXL) instead of a pageable round trip each way.
                if self._text_host is None:
                    self._text_host = HostCopy(self._text_encoder.encoder, pin=True)
                self._text_host.move_out()
                self._text_on_device = False
        return [t for t in out if t is not None], warns, hits

    def peak_vram_gb(self) -> float:
        return torch.cuda.max_memory_allocated(self.device) / 1e9 if self.device.type == "cuda" else 0.0


@contextlib.contextmanager
def memory_errors(what: str) -> Iterator[None]:
    """CUDA out of memory → ModelMemoryError naming `what` (the Engine then frees every warm model)."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        raise ModelMemoryError(f"CUDA out of memory {what}: {e}".splitlines()[0]) from e


def prepare_vae_for_device(vae: WanVAE) -> WanVAE:
    """On CUDA: channels-last convolutions and cuDNN autotuning (the decode runs the same few
    conv shapes once per latent frame, so the one-time search pays back within a video)."""
    if vae.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        vae.use_channels_last()
    return vae
