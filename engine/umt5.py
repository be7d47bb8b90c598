"""umT5-XXL text encoder (Wan's T5 layout) and the prompt -> embeddings wrapper.

`UMT5Encoder` reproduces `models_t5_umt5-xxl-enc-bf16.pth` exactly (keys, shapes and
order, checked by tests/engine/test_umt5.py): Wan's own T5 layout, not transformers' `UMT5EncoderModel`.
T5 conventions: RMSNorm without mean subtraction (variance in fp32), attention without 1/sqrt(d)
scaling plus a learned relative-position bias (one table per block in umT5), gated-GELU (tanh) FFN.

`TextEncoder` tokenizes (padding/truncating to text_len), encodes and zero-fills every position past
each prompt's last token, as Wan does. Tokenizers load only from a local folder (`load_tokenizer`);
the tiny preset uses `HashTokenizer`, which needs no files.

Nothing here is a buffer: the encoder is safe to build on `meta` and load with `assign=True`.
"""

from __future__ import annotations

import hashlib
import html
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import UMT5Config
from .errors import CheckpointError

__all__ = ["HFTokenizer", "HashTokenizer", "PromptTokenizer", "TextEncoder", "UMT5Encoder",
           "clean_prompt", "load_tokenizer"]

logger = logging.getLogger(__name__)

MAX_DISTANCE = 128  # relative distances beyond this share the last bucket
TOKENIZER_FILES = ("spiece.model", "tokenizer.json")


# ---------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------


def relative_position_buckets(query_len: int, key_len: int, num_buckets: int,
                              max_distance: int = MAX_DISTANCE, device: torch.device | None = None) -> Tensor:
    """Bidirectional T5 bucket of (key position - query position): LongTensor [query_len, key_len].

    Half of the buckets are for keys after the query, half for keys at or before it. Within a half,
    the first `max_exact` distances get a bucket each, larger ones share log-spaced buckets up to
    max_distance; everything beyond falls in the last bucket.
    """
    rel_pos = torch.arange(key_len, device=device)[None, :] - torch.arange(query_len, device=device)[:, None]
    half = num_buckets // 2
    buckets = (rel_pos > 0).long() * half
    distance = rel_pos.abs()
    max_exact = half // 2
    # log-spaced part (float32, as the model was trained); distance < max_exact never uses it
    log_ratio = torch.log(distance.clamp(min=max_exact).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (half - max_exact)).long()).clamp(max=half - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class T5RMSNorm(nn.Module):
    """x / rms(x) · weight, with the mean of squares taken in fp32 and no mean subtraction."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.type_as(self.weight)
        return self.weight * x


class T5Attention(nn.Module):
    """Multi-head self-attention, T5 style: no 1/sqrt(head_dim) scaling, additive bias."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: Tensor, attn_bias: Tensor) -> Tensor:
        """x [B, L, dim], attn_bias [B, heads, L, L] (position bias + padding mask) -> [B, L, dim]."""
        b, length, _ = x.shape
        # [B, L, heads·head_dim] -> [B, heads, L, head_dim]
        q, k, v = (proj(x).view(b, length, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, length, -1))


class T5FeedForward(nn.Module):
    """fc2(fc1(x) · gelu_tanh(gate(x))). `gate` is a Sequential for its `gate.0` state-dict key."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class T5RelativeEmbedding(nn.Module):
    """Learned bias per (bucket, head); `embedding.weight` is [num_buckets, num_heads]."""

    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: Tensor) -> Tensor:
        """buckets [Lq, Lk] -> bias [1, heads, Lq, Lk]."""
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


def _fp16_clamp(x: Tensor) -> Tensor:
    # Wan clamps fp16 activations away from inf. It does so only once an inf appears (a host sync);
    # clamping always is the same for every finite value below finfo.max - 1000.
    if x.dtype == torch.float16:
        limit = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-limit, limit)
    return x


class UMT5Block(nn.Module):
    def __init__(self, config: UMT5Config):
        super().__init__()
        self.norm1 = T5RMSNorm(config.dim, config.eps)
        self.attn = T5Attention(config.dim, config.dim_attn, config.num_heads)
        self.norm2 = T5RMSNorm(config.dim, config.eps)
        self.ffn = T5FeedForward(config.dim, config.dim_ffn)
        self.pos_embedding = T5RelativeEmbedding(config.num_buckets, config.num_heads)

    def forward(self, x: Tensor, buckets: Tensor, mask_bias: Tensor) -> Tensor:
        attn_bias = (self.pos_embedding(buckets) + mask_bias).to(x.dtype)   # [B, heads, L, L]
        x = _fp16_clamp(x + self.attn(self.norm1(x), attn_bias))
        return _fp16_clamp(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """ids [B, L], mask [B, L] (1 = token, 0 = padding) -> hidden states [B, L, dim]."""

    def __init__(self, config: UMT5Config | None = None):
        super().__init__()
        self.config = config = config or UMT5Config()
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(UMT5Block(config) for _ in range(config.num_layers))
        self.norm = T5RMSNorm(config.dim, config.eps)

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        length = ids.shape[1]
        x = self.token_embedding(ids)
        # Same buckets for every block; each block has its own bias table.
        buckets = relative_position_buckets(length, length, self.config.num_buckets, device=ids.device)
        # padding keys get the most negative value: [B, 1, 1, L]
        mask_bias = torch.zeros(mask.shape, dtype=torch.float32, device=ids.device)
        mask_bias = mask_bias.masked_fill(mask == 0, torch.finfo(x.dtype).min)[:, None, None, :]
        for block in self.blocks:
            x = block(x, buckets, mask_bias)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------


class PromptTokenizer(Protocol):
    def tokenize(self, prompts: Sequence[str], text_len: int) -> tuple[Tensor, Tensor, list[int]]:
        """-> ids [B, text_len], mask [B, text_len] (long, 1 = token), tokens dropped per prompt."""
        ...


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning: unescape HTML (twice) and collapse whitespace.
    (Wan also runs ftfy.fix_text first; ftfy is not a dependency here.)"""
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


class HFTokenizer:
    """Adapter over a local Hugging Face tokenizer (umT5's SentencePiece) with Wan's settings:
    special tokens (EOS) added, padded and truncated to text_len."""

    def __init__(self, tokenizer: Any):  # a transformers PreTrainedTokenizer(Fast)
        self.tokenizer = tokenizer

    def tokenize(self, prompts: Sequence[str], text_len: int) -> tuple[Tensor, Tensor, list[int]]:
        texts = [clean_prompt(p) for p in prompts]
        full_lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        batch = self.tokenizer(texts, add_special_tokens=True, padding="max_length", truncation=True,
                               max_length=text_len, return_tensors="pt")
        dropped = [max(0, n - text_len) for n in full_lengths]
        return batch["input_ids"].long(), batch["attention_mask"].long(), dropped


class HashTokenizer:
    """File-free tokenizer for the tiny preset: lowercase words and punctuation -> a stable hash.

    id = blake2b(token) mod (vocab_size - 2) + 2; PAD = 0, EOS = 1 (T5's ids). Deterministic across
    processes (Python's hash() is salted per process).
    """

    PAD, EOS = 0, 1

    def __init__(self, vocab_size: int):
        if vocab_size < 3:
            raise ValueError(f"HashTokenizer needs vocab_size >= 3, got {vocab_size}")
        self.vocab_size = vocab_size

    def token_ids(self, text: str) -> list[int]:
        words = re.findall(r"\w+|[^\w\s]", clean_prompt(text).lower())
        ids = [int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
               % (self.vocab_size - 2) + 2 for w in words]
        return ids + [self.EOS]

    def tokenize(self, prompts: Sequence[str], text_len: int) -> tuple[Tensor, Tensor, list[int]]:
        ids = torch.full((len(prompts), text_len), self.PAD, dtype=torch.long)
        mask = torch.zeros((len(prompts), text_len), dtype=torch.long)
        dropped: list[int] = []
        for row, prompt in enumerate(prompts):
            tokens = self.token_ids(prompt)
            dropped.append(max(0, len(tokens) - text_len))
            if len(tokens) > text_len:  # keep EOS last, like HF truncation
                tokens = tokens[:text_len - 1] + [self.EOS]
            ids[row, :len(tokens)] = torch.tensor(tokens)
            mask[row, :len(tokens)] = 1
        return ids, mask, dropped


def load_tokenizer(folder: Path | str) -> HFTokenizer:
    """Load the umT5 tokenizer from a local folder only (never the hub)."""
    folder = Path(folder)
    expected = " or ".join(TOKENIZER_FILES)
    if not folder.is_dir():
        raise CheckpointError(folder, f"tokenizer folder not found (expected a folder with {expected})")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(folder, f"no tokenizer files in the folder (expected {expected})")
    from transformers import AutoTokenizer  # heavy import, only when a real tokenizer is needed

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(folder, f"cannot load the tokenizer ({exc})") from exc
    return HFTokenizer(tokenizer)


# ---------------------------------------------------------------------------------------------
# Prompts -> embeddings
# ---------------------------------------------------------------------------------------------


class TextEncoder:
    """Prompts -> umT5 embeddings [B, text_len, dim], zero past each prompt's last token."""

    def __init__(self, encoder: UMT5Encoder, tokenizer: PromptTokenizer, text_len: int):
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.text_len = text_len

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str]) -> tuple[Tensor, list[str]]:
        """-> (embeddings [B, text_len, dim] on the encoder's device and dtype, warnings)."""
        ids, mask, dropped = self.tokenizer.tokenize(list(prompts), self.text_len)
        warnings: list[str] = []
        for index, count in enumerate(dropped):
            if count:
                message = (f"prompt {index} is longer than {self.text_len} tokens: "
                           f"{count} tokens dropped")
                logger.warning(message)
                warnings.append(message)
        device = self.encoder.device
        ids, mask = ids.to(device), mask.to(device)
        hidden = self.encoder(ids, mask)                             # [B, text_len, dim]
        return hidden.masked_fill(mask[..., None] == 0, 0), warnings

    def offload(self) -> None:
        """Move the encoder to the CPU and give its CUDA memory back."""
        self.encoder.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
