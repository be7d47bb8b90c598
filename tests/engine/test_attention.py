"""SLA reference vs independent float64 math, backend resolution, and the Triton kernel (GPU)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import engine.attention as attention
from engine.attention import (
    AttentionSpec,
    SelfAttentionOp,
    SparseLinearAttentionReference,
    resolve_attention,
    sla_block_selection,
    sla_num_selected,
    sparse_linear_attention_reference,
)
from engine.config import AttentionType
from engine.errors import BackendUnavailableError, RequestError


def _qkv(b: int, length: int, h: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, length, h, d, generator=g, dtype=dtype) for _ in range(3))


def _random_proj(d: int, seed: int = 1) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    proj = nn.Linear(d, d, dtype=torch.float64)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5)
        proj.bias.copy_(torch.randn(d, generator=g, dtype=torch.float64))
    return proj


def _naive_sla(q, k, v, proj: nn.Linear, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Float64 SLA from its definition: masked dense softmax + proj_l(linear attention written as an L x L form)."""
    q, k, v = (t.transpose(1, 2).double() for t in (q, k, v))            # (B, H, L, D)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if token_mask is not None:
        scores = scores.masked_fill(~token_mask, float("-inf"))
    o_sparse = torch.softmax(scores, dim=-1) @ v
    # Linear attention as an explicit kernel matrix A[i, j] = phi(q_i) . phi(k_j).
    a = torch.softmax(q, dim=-1) @ torch.softmax(k, dim=-1).transpose(-1, -2)
    o_linear = (a @ v) / (1e-5 + a.sum(dim=-1, keepdim=True))
    o_linear = o_linear @ proj.weight.double().T + proj.bias.double()
    return (o_sparse + o_linear).transpose(1, 2)


@pytest.mark.parametrize(("length", "blkq", "blkk"), [(200, 128, 64), (150, 32, 16), (64, 128, 64)])
def test_reference_with_full_topk_is_dense_plus_linear_branch(length, blkq, blkk):
    q, k, v = _qkv(2, length, 3, 16)
    proj = _random_proj(16)
    got = sparse_linear_attention_reference(q, k, v, proj, topk=1.0, blkq=blkq, blkk=blkk)
    want = _naive_sla(q, k, v, proj, token_mask=None)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_sparse_branch_excludes_unselected_blocks():
    length, blkq, blkk = 150, 32, 16                    # ragged: 5 query blocks, 10 key blocks
    q, k, v = _qkv(1, length, 2, 8, seed=3)
    proj = _random_proj(8)
    lut = sla_block_selection(q, k, topk=0.3, blkq=blkq, blkk=blkk)       # (B, H, Nq, 3)
    assert lut.shape == (1, 2, 5, 3)
    # Token-level mask built from the same block selection.
    nq, nk = lut.shape[2], math.ceil(length / blkk)
    block_mask = torch.zeros(1, 2, nq, nk, dtype=torch.bool).scatter_(-1, lut, True)
    token_mask = block_mask.repeat_interleave(blkq, 2).repeat_interleave(blkk, 3)[..., :length, :length]

    got = sparse_linear_attention_reference(q, k, v, proj, topk=0.3, blkq=blkq, blkk=blkk)
    torch.testing.assert_close(got, _naive_sla(q, k, v, proj, token_mask), rtol=1e-10, atol=1e-10)
    # ...and the sparsity matters: dense attention gives something else.
    assert (got - _naive_sla(q, k, v, proj, None)).abs().max() > 1e-3


def test_block_selection_is_topk_of_pooled_smoothed_scores():
    length, blkq, blkk = 100, 32, 16
    q, k, _ = _qkv(1, length, 1, 8, seed=5)
    qh, kh = q[0, :, 0], k[0, :, 0]                      # (L, D)
    ks = kh - kh.mean(dim=0)
    pq = torch.stack([qh[i:i + blkq].mean(0) for i in range(0, length, blkq)])
    pk = torch.stack([ks[j:j + blkk].mean(0) for j in range(0, length, blkk)])
    scores = pq @ pk.T                                   # (4, 7)
    n_sel = int(0.5 * 7)
    want = [sorted(row.argsort(descending=True)[:n_sel].tolist()) for row in scores]
    lut = sla_block_selection(q, k, topk=0.5, blkq=blkq, blkk=blkk)[0, 0]
    assert [sorted(row.tolist()) for row in lut] == want


def test_num_selected_truncates_like_turbodiffusion_but_keeps_one():
    assert sla_num_selected(512, 0.1) == 51
    assert sla_num_selected(10, 0.15) == 1
    assert sla_num_selected(5, 0.1) == 1               # int(0.5) == 0 in the kernel: we keep one block
    assert sla_num_selected(7, 1.0) == 7


def test_reference_module_matches_function_and_handles_bf16():
    q, k, v = _qkv(1, 70, 2, 16, dtype=torch.float32)
    module = SparseLinearAttentionReference(16, topk=0.5, blkq=32, blkk=16)
    assert torch.count_nonzero(module.proj_l.weight) == 0
    out = module(q, k, v)
    assert out.shape == q.shape
    torch.testing.assert_close(out, sparse_linear_attention_reference(q, k, v, module.proj_l, 0.5, 32, 16))
    out16 = module(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), out, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kind", [AttentionType.ORIGINAL, AttentionType.SLA, AttentionType.SAGESLA])
def test_self_attention_op_always_holds_zero_proj_l(kind):
    op = SelfAttentionOp(16, AttentionSpec(kind))
    state = op.state_dict()
    assert list(state) == ["local_attn.proj_l.weight", "local_attn.proj_l.bias"]
    assert state["local_attn.proj_l.weight"].shape == (16, 16)
    assert all(torch.count_nonzero(t) == 0 for t in state.values())


def test_original_backend_is_dense_softmax_and_ignores_proj_l():
    q, k, v = _qkv(1, 40, 2, 8)
    op = SelfAttentionOp(8, AttentionSpec(AttentionType.ORIGINAL)).double()
    with torch.no_grad():
        op.local_attn.proj_l.weight.fill_(1.0)
    proj_zero = nn.Linear(8, 8, dtype=torch.float64)
    nn.init.zeros_(proj_zero.weight)
    nn.init.zeros_(proj_zero.bias)
    want = _naive_sla(q, k, v, proj_zero, None)         # zero proj_l: only the dense softmax remains
    torch.testing.assert_close(op(q, k, v), want, rtol=1e-10, atol=1e-10)


def test_spec_rejects_unresolved_or_bad_values():
    with pytest.raises(ValueError, match="resolve_attention"):
        AttentionSpec(AttentionType.AUTO)
    with pytest.raises(RequestError, match="sla_topk"):
        AttentionSpec(AttentionType.SLA, topk=0.0)


# --- backend resolution -------------------------------------------------------------------------

@pytest.fixture
def no_kernels(monkeypatch):
    monkeypatch.setattr(attention, "sla_kernels_available", lambda: False)
    monkeypatch.setattr(attention, "sagesla_kernels_available", lambda: False)


def test_resolve_on_cpu(no_kernels):
    cpu = torch.device("cpu")
    assert resolve_attention("auto", cpu) is AttentionType.SLA
    assert resolve_attention("SLA", cpu) is AttentionType.SLA
    assert resolve_attention("original", cpu) is AttentionType.ORIGINAL
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        resolve_attention("sagesla", cpu)


def test_resolve_unknown_name():
    with pytest.raises(RequestError, match="attention_type.*original \\| sla \\| sagesla \\| auto"):
        resolve_attention("flash", torch.device("cpu"))


def test_explicit_sla_on_cuda_without_turbodiffusion_says_how_to_install(no_kernels):
    needle = r"turbodiffusion\.SLA.*pip install -e \.\[gpu\].*no-build-isolation"
    with pytest.raises(BackendUnavailableError, match=needle):
        resolve_attention("sla", torch.device("cuda"))


def test_explicit_sagesla_without_spargeattn_says_how_to_install(no_kernels):
    with pytest.raises(BackendUnavailableError, match="spas_sage_attn.*SpargeAttn"):
        resolve_attention("sagesla", torch.device("cuda"))


def test_auto_on_cuda_prefers_sagesla_then_sla(monkeypatch, no_kernels):
    cuda = torch.device("cuda")
    assert resolve_attention("auto", cuda) is AttentionType.SLA
    monkeypatch.setattr(attention, "sla_kernels_available", lambda: True)
    assert resolve_attention("auto", cuda) is AttentionType.SLA
    assert resolve_attention("sla", cuda) is AttentionType.SLA
    monkeypatch.setattr(attention, "sagesla_kernels_available", lambda: True)
    assert resolve_attention("auto", cuda) is AttentionType.SAGESLA
    assert resolve_attention("sagesla", cuda) is AttentionType.SAGESLA


# --- Triton kernel vs reference (lent GPU) ------------------------------------------------------

def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("topk", [1.0, 0.2])
@torch.no_grad()
def test_triton_sla_matches_cpu_reference(topk):
    pytest.importorskip("turbodiffusion.SLA", reason="turbodiffusion (SLA Triton kernels) not installed")
    from turbodiffusion.SLA import SparseLinearAttention
    from turbodiffusion.SLA.utils import get_block_map

    torch.manual_seed(0)
    b, length, h, d = 2, 1000, 3, 128                   # L not a multiple of 128 or 64
    q, k, v = (torch.randn(b, length, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    kernel = SparseLinearAttention(d, topk, BLKQ=128, BLKK=64).cuda()
    assert set(kernel.state_dict()) == {"proj_l.weight", "proj_l.bias"}
    kernel.proj_l.weight.copy_(torch.randn(d, d) / d**0.5)
    kernel.proj_l.bias.copy_(torch.randn(d) * 0.1)
    out = kernel(q, k, v).float().cpu()

    # Same block map as the kernel (ties in bf16 pooled scores could otherwise pick different blocks).
    _, lut, _ = get_block_map(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), topk, 128, 64)
    proj = nn.Linear(d, d, dtype=torch.float64)
    proj.load_state_dict({n: t.double().cpu() for n, t in kernel.proj_l.state_dict().items()})
    qc, kc, vc = (t.double().cpu() for t in (q, k, v))
    ref = sparse_linear_attention_reference(qc, kc, vc, proj, topk, 128, 64, lut=lut.cpu().long())
    err = _rel_err(out, ref)
    print(f"topk={topk}: relative error kernel vs reference {err:.2e}")
    assert err <= 1e-2

    # Our own block selection picks (almost) the same blocks as the kernel's.
    ours = sla_block_selection(qc, kc, topk, 128, 64).sort(-1).values
    agree = (ours == lut.cpu().long().sort(-1).values).float().mean()
    assert agree > 0.95
