"""Attention backends for the Wan DiT: dense SDPA, SLA (sparse-linear attention) and SageSLA.

The backend and top-k are per-request runtime settings of one loaded model
(`SelfAttentionOp.set_runtime`). Every backend keeps the same module tree, so a released TurboWan
checkpoint (trained with SLA) loads strictly whatever backend runs it:

    self_attn.attn_op                 SelfAttentionOp
    self_attn.attn_op.local_attn      SLA module (TurboDiffusion's kernel class or our reference)
    self_attn.attn_op.local_attn.proj_l.{weight,bias}   Linear(head_dim, head_dim), zero-init

`original` runs dense SDPA and ignores proj_l. `sla` runs TurboDiffusion's Triton kernel on CUDA and
`sparse_linear_attention_reference` (plain torch, same math) elsewhere. `sagesla` runs SpargeAttn's
int8/fp8 kernels. Tensors come in and go out as (B, L, H, D), Wan's layout.

SLA math (turbodiffusion/SLA/core.py + utils.py + kernel.py), with q, k, v (B, H, L, D):
  1. block map: k_s = k - mean_L(k) ("smooth-K"); mean-pool q over BLKQ-token blocks and k_s over BLKK
     blocks (a ragged last block is averaged over its real tokens); score = pool(q) @ pool(k_s)^T (no
     scale); each query block keeps its top int(topk * num_kblocks) key blocks.
  2. sparse branch: softmax(q k^T / sqrt(D)) over the real keys of the kept blocks only, times v.
  3. linear branch over ALL tokens: phi = softmax over the head dim, applied to q and the raw k;
     o_l = phi(q) (phi(k)^T v) / (1e-5 + phi(q) . sum_L phi(k)).
  4. o = o_sparse + proj_l(o_linear).
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import AttentionType
from .errors import BackendUnavailableError, RequestError

log = logging.getLogger(__name__)

__all__ = ["AttentionSpec", "SelfAttentionOp", "SparseLinearAttentionReference", "cross_attention",
           "dense_attention", "linear_attention_branch", "resolve_attention", "sagesla_kernels_available",
           "sla_block_selection", "sla_kernels_available", "sla_num_selected",
           "sparse_linear_attention_reference"]

LINEAR_EPS = 1e-5   # denominator epsilon of the linear branch (TurboDiffusion repo HEAD)

_SLA_INSTALL = ("install TurboDiffusion's kernels: `pip install -e .[gpu]` (turbodiffusion builds a CUDA "
                "extension, so pip needs --no-build-isolation), or use attention_type=original")
_SAGE_INSTALL = ("build SpargeAttn from source: `pip install git+https://github.com/thu-ml/SpargeAttn.git "
                 "--no-build-isolation` (it is not on PyPI), plus `pip install -e .[gpu]` for turbodiffusion; "
                 "or use attention_type=sla")


@dataclass(frozen=True)
class AttentionSpec:
    """Which self-attention backend a DiT is built with. `type` must already be resolved (no `auto`)."""
    type: AttentionType
    topk: float = 0.1   # fraction of key blocks each query block attends to
    blkq: int = 128     # query block size (TurboDiffusion passes BLKQ=128 for `sla`)
    blkk: int = 64      # key block size (the Triton kernel requires 64)

    def __post_init__(self) -> None:
        if self.type is AttentionType.AUTO:
            raise ValueError("AttentionSpec needs a resolved type; call resolve_attention() first")
        if not 0 < self.topk <= 1:
            raise RequestError("sla_topk", self.topk, "a fraction in (0, 1]")


@functools.cache
def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:   # ImportError, or a broken CUDA extension raising at import
        return False
    return True


def sla_kernels_available() -> bool:
    return _importable("turbodiffusion.SLA")


def sagesla_kernels_available() -> bool:
    return _importable("spas_sage_attn") and _importable("turbodiffusion.SLA")


def resolve_attention(requested: str, device: torch.device) -> AttentionType:
    """Turn a requested backend name into the one that runs on `device`.

    `auto` picks sagesla where SpargeAttn is installed on CUDA, otherwise sla (Triton on CUDA when
    turbodiffusion is installed, the torch reference otherwise). An explicit backend whose kernels are
    missing raises BackendUnavailableError saying what to install.
    """
    try:
        kind = AttentionType(str(requested).lower())
    except ValueError:
        raise RequestError("attention_type", requested,
                           " | ".join(a.value for a in AttentionType)) from None
    on_cuda = torch.device(device).type == "cuda"
    if kind is AttentionType.AUTO:
        if on_cuda and sagesla_kernels_available():
            return AttentionType.SAGESLA
        if on_cuda and not sla_kernels_available():
            log.warning("turbodiffusion.SLA is not installed: SLA runs as the (slow) torch reference; %s",
                        _SLA_INSTALL)
        return AttentionType.SLA
    if kind is AttentionType.SLA and on_cuda and not sla_kernels_available():
        raise BackendUnavailableError(f"attention_type=sla on CUDA needs turbodiffusion.SLA: {_SLA_INSTALL}")
    if kind is AttentionType.SAGESLA:
        if not on_cuda:
            raise BackendUnavailableError("attention_type=sagesla needs a CUDA device (SpargeAttn kernels); "
                                          "use attention_type=sla on CPU")
        if not sagesla_kernels_available():
            raise BackendUnavailableError(
                f"attention_type=sagesla needs spas_sage_attn and turbodiffusion.SLA: {_SAGE_INSTALL}")
    return kind


# ---------------------------------------------------------------------------------------------
# SLA reference (plain torch)
# ---------------------------------------------------------------------------------------------

def _block_mean(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over consecutive `block`-token chunks of dim -2; the last chunk over its real tokens only."""
    # x: (B, H, L, D) -> (B, H, ceil(L/block), D)
    length = x.shape[-2]
    nblocks = -(-length // block)
    pad = nblocks * block - length
    sums = F.pad(x, (0, 0, 0, pad)).unflatten(-2, (nblocks, block)).sum(dim=-2)
    counts = torch.full((nblocks,), float(block), dtype=x.dtype, device=x.device)
    counts[-1] = block - pad
    return sums / counts[:, None]


def sla_num_selected(num_kblocks: int, topk: float) -> int:
    """Key blocks kept per query block. TurboDiffusion uses int(topk * K); we keep at least one, where
    the kernel would divide by zero (topk * K < 1 only happens for very short sequences)."""
    return max(1, min(num_kblocks, int(topk * num_kblocks)))


def sla_block_selection(q: torch.Tensor, k: torch.Tensor, topk: float, blkq: int, blkk: int) -> torch.Tensor:
    """Indices of the key blocks each query block attends to: (B, H, L, D) x2 -> (B, H, Nq, n_sel) int64."""
    q, k = q.transpose(1, 2), k.transpose(1, 2)                 # (B, H, L, D)
    k_smooth = k - k.mean(dim=-2, keepdim=True)
    scores = _block_mean(q, blkq) @ _block_mean(k_smooth, blkk).transpose(-1, -2)   # (B, H, Nq, Nk)
    n_sel = sla_num_selected(scores.shape[-1], topk)
    return torch.topk(scores, n_sel, dim=-1, sorted=False).indices


def _block_sparse_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    lut: torch.Tensor, blkq: int, blkk: int) -> torch.Tensor:
    """Softmax attention of each query block over its selected key blocks. q, k, v (B, H, L, D)."""
    b, h, length, d = q.shape
    nq, nk = -(-length // blkq), -(-length // blkk)
    n_sel = lut.shape[-1]
    # Pad to whole blocks, as the kernel's masked loads do; padded keys get -inf scores below.
    qb = F.pad(q, (0, 0, 0, nq * blkq - length)).unflatten(2, (nq, blkq))     # (B, H, Nq, BLKQ, D)
    kb = F.pad(k, (0, 0, 0, nk * blkk - length)).unflatten(2, (nk, blkk))     # (B, H, Nk, BLKK, D)
    vb = F.pad(v, (0, 0, 0, nk * blkk - length)).unflatten(2, (nk, blkk))
    key_valid = (torch.arange(nk * blkk, device=q.device) < length).view(nk, blkk)

    # Gather the selected key blocks per query block: (B, H, Nq, n_sel * BLKK, D).
    flat = lut.reshape(b, h, nq * n_sel)
    gather = flat[..., None, None].expand(b, h, nq * n_sel, blkk, d)
    k_sel = torch.gather(kb, 2, gather).view(b, h, nq, n_sel * blkk, d)
    v_sel = torch.gather(vb, 2, gather).view(b, h, nq, n_sel * blkk, d)
    valid = key_valid[lut].view(b, h, nq, 1, n_sel * blkk)

    scores = (qb @ k_sel.transpose(-1, -2)) * d ** -0.5      # (B, H, Nq, BLKQ, n_sel * BLKK)
    scores = scores.masked_fill(~valid, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v_sel               # (B, H, Nq, BLKQ, D)
    return out.flatten(2, 3)[:, :, :length]


def linear_attention_branch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SLA's linear branch over all tokens, softmax feature map over the head dim. (B, H, L, D) in/out."""
    phi_q, phi_k = torch.softmax(q, dim=-1), torch.softmax(k, dim=-1)
    kv = phi_k.transpose(-1, -2) @ v                          # (B, H, D, D)
    k_sum = phi_k.sum(dim=-2, keepdim=True)                   # (B, H, 1, D)
    return (phi_q @ kv) / (LINEAR_EPS + (phi_q * k_sum).sum(dim=-1, keepdim=True))


def sparse_linear_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_l: nn.Linear,
                                      topk: float, blkq: int, blkk: int,
                                      lut: torch.Tensor | None = None) -> torch.Tensor:
    """SLA in plain torch, computed in the input dtype. (B, L, H, D) in and out.

    `lut` (B, H, Nq, n_sel) overrides the block selection (tests feed the kernel's own selection)."""
    if lut is None:
        lut = sla_block_selection(q, k, topk, blkq, blkk)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))       # (B, H, L, D)
    o_sparse = _block_sparse_softmax_attention(qt, kt, vt, lut, blkq, blkk)
    o_linear = linear_attention_branch(qt, kt, vt)
    o_linear = F.linear(o_linear, proj_l.weight.to(o_linear.dtype), proj_l.bias.to(o_linear.dtype))
    return (o_sparse + o_linear).transpose(1, 2)


class SparseLinearAttentionReference(nn.Module):
    """Torch twin of turbodiffusion.SLA.SparseLinearAttention: same state_dict (proj_l only), same math."""

    def __init__(self, head_dim: int, topk: float, blkq: int = 128, blkk: int = 64):
        super().__init__()
        self.topk, self.blkq, self.blkk = topk, blkq, blkk
        self.proj_l = nn.Linear(head_dim, head_dim, dtype=torch.float32)
        with torch.no_grad():   # zero-init like SLA: before fine-tuning the linear branch adds nothing
            nn.init.zeros_(self.proj_l.weight)
            nn.init.zeros_(self.proj_l.bias)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sparse_linear_attention_reference(q, k, v, self.proj_l, self.topk, self.blkq, self.blkk)


# ---------------------------------------------------------------------------------------------
# Modules used by the DiT
# ---------------------------------------------------------------------------------------------

def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention via SDPA. (B, L, H, D) in and out."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


cross_attention = dense_attention   # text cross-attention is always dense (TurboDiffusion never sparsifies it)


def _kernel_local_attn(spec: AttentionSpec, head_dim: int) -> nn.Module | None:
    """TurboDiffusion's SLA module when its package is installed, else None.

    Built whatever backend the first request asks for: the backend and top-k are chosen per
    request (`SelfAttentionOp.set_runtime`), and an SLA-trained checkpoint may run under any.
    """
    if sla_kernels_available():
        from turbodiffusion.SLA import SparseLinearAttention
        return SparseLinearAttention(head_dim, spec.topk, BLKQ=spec.blkq, BLKK=spec.blkk)
    return None


class SelfAttentionOp(nn.Module):
    """The DiT's self-attention kernel (`self_attn.attn_op`). Its child `local_attn` always owns proj_l.

    The backend and top-k are runtime settings, not part of the weights: `set_runtime()` switches
    them between requests on one loaded model (two rows that differ only in top-k share a load).
    It is called outside any compiled region; a compiled block guards on the values, so each
    distinct setting compiles once and is then reused.
    """

    def __init__(self, head_dim: int, spec: AttentionSpec):
        super().__init__()
        self.spec = spec
        self.head_dim = head_dim
        kernel = _kernel_local_attn(spec, head_dim)
        self.has_kernel = kernel is not None
        self.local_attn: nn.Module = kernel if kernel is not None else SparseLinearAttentionReference(
            head_dim, spec.topk, spec.blkq, spec.blkk)
        self._sage: nn.Module | None = None

    def set_runtime(self, kind: AttentionType, topk: float) -> None:
        """Backend and top-k for the next forwards. `kind` must be resolved (see resolve_attention)."""
        if kind is self.spec.type and topk == self.spec.topk:
            return
        self.spec = AttentionSpec(type=kind, topk=topk, blkq=self.spec.blkq, blkk=self.spec.blkk)
        self.local_attn.topk = topk  # type: ignore[assignment]  # the kernel reads it at forward
        if self._sage is not None:
            self._sage.topk = topk  # type: ignore[assignment]

    def _sage_module(self) -> nn.Module:
        """SpargeAttn's SageSLA, built on first use and sharing local_attn's proj_l (one set of weights)."""
        if self._sage is None:
            from turbodiffusion.SLA import SageSparseLinearAttention
            sage = SageSparseLinearAttention(self.head_dim, self.spec.topk)
            sage.proj_l = self.local_attn.proj_l
            object.__setattr__(self, "_sage", sage)   # not a child: its state is local_attn's
        assert self._sage is not None
        return self._sage

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q, k, v: (B, L, H, D) -> (B, L, H, D). Branches depend on runtime settings and device only.
        if self.spec.type is AttentionType.ORIGINAL:
            return dense_attention(q, k, v)
        if self.spec.type is AttentionType.SAGESLA and q.is_cuda:
            return self._sage_module()(q, k, v)
        if self.has_kernel and q.is_cuda:
            return self.local_attn(q, k, v)
        proj_l = self.local_attn.proj_l
        assert isinstance(proj_l, nn.Linear)
        return sparse_linear_attention_reference(q, k, v, proj_l, self.spec.topk, self.spec.blkq, self.spec.blkk)
