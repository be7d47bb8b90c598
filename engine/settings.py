"""Engine settings, read from the environment once, at the edge (the CLI, a worker, a task).

Nothing under engine/ reads `os.environ`: the edge builds `EngineSettings.from_env(os.environ)`
and passes it down. Variables:

    CHECKPOINTS_DIR             folder with the checkpoint files (default ./checkpoints)
    TURBO_VRAM_BUDGET_GB        warm-model cache budget per GPU (default 92 % of the GPU)
    TURBO_COMPILE               auto (default) | 1 | 0: compile the DiT's blocks
    TURBO_COMPILE_MIN_ROWS      rows a worker must have coming before `auto` compiles (30; 8 for 14B)
    TURBO_ALLOW_RANDOM_WEIGHTS  1 lets real-size presets run with random weights (benchmarks only)
    TURBO_INT8_KERNELS          1 runs -quant files on TurboDiffusion's int8 GEMMs (default: dequantize)
    TURBO_EMBED_CACHE           text-embedding cache folder (~/.cache/turbo-batch/text)
    TURBO_EXPERT_POLICY         auto (default) | resident | swap | sequential: where A14B's two
                                experts live (engine/experts.py); auto picks from the VRAM budget
    TURBO_EXPERT_GROUP_ROWS     rows per group under the sequential policy (default 4)
    TURBO_DIGEST_CACHE          where checkpoint digests go when the checkpoint folder is read-only
                                (~/.cache/turbo-batch/digests)
    TURBO_FP8_CACHE             where quant_linear=fp8 keeps converted weights when the checkpoint
                                folder is read-only (~/.cache/turbo-batch/fp8)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RequestError

__all__ = ["EngineSettings"]

_CACHE_HOME = Path.home() / ".cache" / "turbo-batch"


@dataclass(frozen=True)
class EngineSettings:
    checkpoints_dir: Path | None = None
    vram_budget_gb: float | None = None
    compile: str = "auto"
    compile_min_rows: int | None = None
    allow_random_weights: bool = False
    int8_kernels: bool = False
    embed_cache_dir: Path = field(default_factory=lambda: _CACHE_HOME / "text")
    digest_cache_dir: Path = field(default_factory=lambda: _CACHE_HOME / "digests")
    fp8_cache_dir: Path = field(default_factory=lambda: _CACHE_HOME / "fp8")
    expert_policy: str = "auto"
    expert_group_rows: int = 4

    def __post_init__(self) -> None:
        if self.compile not in ("auto", "0", "1"):
            raise RequestError("TURBO_COMPILE", self.compile, "auto | 1 | 0")
        if self.expert_policy not in ("auto", "resident", "swap", "sequential"):
            raise RequestError("TURBO_EXPERT_POLICY", self.expert_policy,
                               "auto | resident | swap | sequential")
        if self.expert_group_rows < 1:
            raise RequestError("TURBO_EXPERT_GROUP_ROWS", self.expert_group_rows, "a whole number ≥ 1")

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, checkpoints_dir: str | Path | None = None) -> EngineSettings:
        """`checkpoints_dir` (a CLI option or run parameter) wins over CHECKPOINTS_DIR."""
        def number(name: str) -> float | None:
            raw = (env.get(name) or "").strip()
            if not raw:
                return None
            try:
                return float(raw)
            except ValueError:
                raise RequestError(name, raw, "a number") from None

        ckpt = checkpoints_dir or env.get("CHECKPOINTS_DIR") or None
        min_rows = number("TURBO_COMPILE_MIN_ROWS")
        group_rows = number("TURBO_EXPERT_GROUP_ROWS")
        if group_rows is not None and not group_rows.is_integer():
            raise RequestError("TURBO_EXPERT_GROUP_ROWS", group_rows, "a whole number ≥ 1")
        defaults = cls()
        return cls(
            checkpoints_dir=Path(ckpt) if ckpt else None,
            vram_budget_gb=number("TURBO_VRAM_BUDGET_GB"),
            compile=(env.get("TURBO_COMPILE") or "auto").strip().lower(),
            compile_min_rows=None if min_rows is None else int(min_rows),
            allow_random_weights=env.get("TURBO_ALLOW_RANDOM_WEIGHTS") == "1",
            int8_kernels=env.get("TURBO_INT8_KERNELS") == "1",
            embed_cache_dir=Path(env["TURBO_EMBED_CACHE"]) if env.get("TURBO_EMBED_CACHE")
            else defaults.embed_cache_dir,
            digest_cache_dir=Path(env["TURBO_DIGEST_CACHE"]) if env.get("TURBO_DIGEST_CACHE")
            else defaults.digest_cache_dir,
            fp8_cache_dir=Path(env["TURBO_FP8_CACHE"]) if env.get("TURBO_FP8_CACHE") else defaults.fp8_cache_dir,
            expert_policy=(env.get("TURBO_EXPERT_POLICY") or "auto").strip().lower(),
            expert_group_rows=defaults.expert_group_rows if group_rows is None else int(group_rows),
        )
