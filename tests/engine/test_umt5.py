"""umT5 encoder: checkpoint layout, math against a naive float64 T5 written below, relative
position buckets, TextEncoder zero-fill and truncation warnings, tokenizers (hash and local HF)."""

from __future__ import annotations

import hashlib
import logging
import math

import pytest
import torch

from engine.config import UMT5Config, WanConfig
from engine.errors import CheckpointError
from engine.umt5 import (
    HashTokenizer,
    HFTokenizer,
    TextEncoder,
    UMT5Encoder,
    load_tokenizer,
    relative_position_buckets,
)

TINY = WanConfig.from_name("tiny-t2v").umt5


def _random_encoder(seed: int = 0, config: UMT5Config = TINY) -> UMT5Encoder:
    torch.manual_seed(seed)
    encoder = UMT5Encoder(config).eval()
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                p.uniform_(0.5, 1.5)
            elif "embedding" not in name:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return encoder


# ---------------------------------------------------------------------------------------------
# 1. Layout
# ---------------------------------------------------------------------------------------------


def test_state_dict_matches_umt5_xxl_file_layout():
    with torch.device("meta"):
        encoder = UMT5Encoder(UMT5Config())
    state = encoder.state_dict()
    assert len(state) == 242
    assert sum(t.numel() for t in state.values()) == 5_680_910_336
    block = [("norm1.weight", (4096,)), ("attn.q.weight", (4096, 4096)), ("attn.k.weight", (4096, 4096)),
             ("attn.v.weight", (4096, 4096)), ("attn.o.weight", (4096, 4096)), ("norm2.weight", (4096,)),
             ("ffn.gate.0.weight", (10240, 4096)), ("ffn.fc1.weight", (10240, 4096)),
             ("ffn.fc2.weight", (4096, 10240)), ("pos_embedding.embedding.weight", (32, 64))]
    expected = [("token_embedding.weight", (256384, 4096))]
    expected += [(f"blocks.{i}.{name}", shape) for i in range(24) for name, shape in block]
    expected += [("norm.weight", (4096,))]
    assert [(k, tuple(t.shape)) for k, t in state.items()] == expected


def test_built_on_meta_then_assign_loaded_runs_like_a_cpu_built_model():
    reference = _random_encoder()
    with torch.device("meta"):
        encoder = UMT5Encoder(TINY)
    encoder.load_state_dict(reference.state_dict(), assign=True)
    ids = torch.randint(2, TINY.vocab_size, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    torch.testing.assert_close(encoder(ids, mask), reference(ids, mask), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# 2. Math against a naive float64 T5 encoder (loops, explicit softmax, gelu-tanh formula)
# ---------------------------------------------------------------------------------------------


def _naive_bucket(relative: int, num_buckets: int, max_distance: int = 128) -> int:
    """T5's bidirectional bucket of (key - query), one scalar at a time."""
    half = num_buckets // 2
    offset = half if relative > 0 else 0
    distance = abs(relative)
    exact = half // 2
    if distance < exact:
        return offset + distance
    spread = int(math.log(distance / exact) / math.log(max_distance / exact) * (half - exact))
    return offset + min(exact + spread, half - 1)


def _naive_encoder(state: dict[str, torch.Tensor], config: UMT5Config, ids, mask):
    w = {k: v.double() for k, v in state.items()}

    def rms(x, weight):
        return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + config.eps)

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    b, length = ids.shape
    heads, head_dim = config.num_heads, config.dim_attn // config.num_heads
    buckets = [[_naive_bucket(j - i, config.num_buckets) for j in range(length)] for i in range(length)]
    x = w["token_embedding.weight"][ids]
    for layer in range(config.num_layers):
        p = f"blocks.{layer}."
        table = w[p + "pos_embedding.embedding.weight"]                 # [buckets, heads]
        h = rms(x, w[p + "norm1.weight"])
        q, k, v = (h @ w[p + f"attn.{n}.weight"].T for n in "qkv")
        out = torch.zeros(b, length, heads * head_dim, dtype=torch.float64)
        for batch in range(b):
            for head in range(heads):
                cols = slice(head * head_dim, (head + 1) * head_dim)
                for i in range(length):
                    scores = [
                        float(q[batch, i, cols] @ k[batch, j, cols]) + float(table[buckets[i][j], head])
                        if mask[batch, j] else -math.inf
                        for j in range(length)]
                    top = max(scores)
                    probs = torch.tensor([math.exp(s - top) for s in scores], dtype=torch.float64)
                    out[batch, i, cols] = (probs / probs.sum()) @ v[batch, :, cols]
        x = x + out @ w[p + "attn.o.weight"].T
        h = rms(x, w[p + "norm2.weight"])
        gated = (h @ w[p + "ffn.fc1.weight"].T) * gelu_tanh(h @ w[p + "ffn.gate.0.weight"].T)
        x = x + gated @ w[p + "ffn.fc2.weight"].T
    return rms(x, w["norm.weight"])


def test_forward_matches_naive_float64_t5():
    encoder = _random_encoder()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, TINY.vocab_size, (2, 10), generator=g)
    mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4])
    expected = _naive_encoder(encoder.state_dict(), TINY, ids, mask)
    hidden = encoder(ids, mask)
    assert hidden.shape == (2, 10, TINY.dim)
    torch.testing.assert_close(hidden.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_buckets", [32, 8])
def test_relative_position_buckets_match_naive(num_buckets):
    length = 300  # reaches past max_distance = 128 on both sides
    table = relative_position_buckets(length, length, num_buckets)
    for i, j in [(0, 0), (0, 1), (1, 0), (5, 0), (0, 9), (0, 16), (16, 0), (0, 100), (0, 127),
                 (0, 128), (200, 0), (0, 299), (150, 149), (150, 151), (37, 250)]:
        assert table[i, j].item() == _naive_bucket(j - i, num_buckets), (i, j)
    assert table.min() == 0 and table.max() == num_buckets - 1


# ---------------------------------------------------------------------------------------------
# 3. TextEncoder and HashTokenizer
# ---------------------------------------------------------------------------------------------


def _text_encoder(text_len: int = TINY.text_len) -> TextEncoder:
    return TextEncoder(_random_encoder(), HashTokenizer(TINY.vocab_size), text_len)


def test_hash_tokenizer_is_stable_and_in_range():
    tokenizer = HashTokenizer(512)
    ids, mask, dropped = tokenizer.tokenize(["A red  fox.", "a red fox ."], 8)
    digest = hashlib.blake2b(b"fox", digest_size=8).digest()
    fox = int.from_bytes(digest, "little") % 510 + 2              # independent of the class
    assert ids[0].tolist() == ids[1].tolist()                      # case and spacing do not matter
    assert ids[0, 2].item() == fox
    assert ids[0, 4].item() == HashTokenizer.EOS and ids[0, 5:].tolist() == [0, 0, 0]
    assert mask[0].tolist() == [1] * 5 + [0] * 3
    assert dropped == [0, 0]
    assert ((ids[mask.bool()] >= 1) & (ids[mask.bool()] < 512)).all()


def test_embeddings_are_zero_past_each_prompt():
    text = _text_encoder()
    embeddings, warnings = text.encode(["a cat", "a dog runs on the beach at sunset"])
    assert embeddings.shape == (2, TINY.text_len, TINY.dim)
    assert warnings == []
    # "a cat" + EOS = 3 tokens; the other prompt 8 words + EOS = 9 tokens
    for row, length in enumerate((3, 9)):
        assert embeddings[row, length:].abs().sum() == 0
        assert (embeddings[row, :length].abs().sum(-1) > 0).all()
    ids, mask, _ = text.tokenizer.tokenize(["a cat"], TINY.text_len)
    torch.testing.assert_close(embeddings[0, :3], text.encoder(ids, mask)[0, :3])


def test_long_prompt_is_truncated_with_a_warning(caplog):
    text = _text_encoder(text_len=16)
    prompt = " ".join(f"word{i}" for i in range(20))                 # 20 words + EOS = 21 tokens
    with caplog.at_level(logging.WARNING, logger="engine.umt5"):
        embeddings, warnings = text.encode(["short prompt", prompt])
    assert embeddings.shape == (2, 16, TINY.dim)
    assert len(warnings) == 1 and "prompt 1" in warnings[0] and "5 tokens dropped" in warnings[0]
    assert warnings[0] in caplog.text
    assert (embeddings[1].abs().sum(-1) > 0).all()                   # all 16 positions are used


def test_offload_moves_the_encoder_to_cpu():
    text = _text_encoder()
    text.offload()
    assert all(p.device.type == "cpu" for p in text.encoder.parameters())


# ---------------------------------------------------------------------------------------------
# 4. Local Hugging Face tokenizer folder
# ---------------------------------------------------------------------------------------------


def _save_tiny_t5_style_tokenizer(folder) -> None:
    """A WordLevel tokenizer with T5's special tokens (pad 0, eos 1, unk 2) that appends </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"])
    tok.train_from_iterator(["a red fox runs in the snow", "a cat sleeps on a warm roof at night"], trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                      unk_token="<unk>")
    wrapped.save_pretrained(str(folder))


def test_load_tokenizer_from_local_folder(tmp_path):
    _save_tiny_t5_style_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    tokenizer = load_tokenizer(tmp_path)
    assert isinstance(tokenizer, HFTokenizer)
    ids, mask, dropped = tokenizer.tokenize(["a red  fox", "a cat sleeps on a warm roof at night"], 6)
    assert ids.shape == mask.shape == (2, 6)
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0]
    assert ids[0, 3].item() == 1 and ids[0, 4:].tolist() == [0, 0]  # EOS, then padding
    assert ids[1, -1].item() == 1                                      # truncation keeps EOS
    assert dropped == [0, 4]                                          # 9 words + EOS - 6


def test_text_encoder_with_a_local_tokenizer(tmp_path):
    _save_tiny_t5_style_tokenizer(tmp_path)
    text = TextEncoder(_random_encoder(), load_tokenizer(tmp_path), 8)
    embeddings, warnings = text.encode(["a red fox runs"])
    assert embeddings.shape == (1, 8, TINY.dim)
    assert warnings == []
    assert embeddings[0, 5:].abs().sum() == 0 and (embeddings[0, :5].abs().sum(-1) > 0).all()


def test_missing_tokenizer_folder_names_it(tmp_path):
    missing = tmp_path / "google" / "umt5-xxl"
    with pytest.raises(CheckpointError, match="spiece.model or tokenizer.json") as info:
        load_tokenizer(missing)
    assert str(missing) in str(info.value)


def test_folder_without_tokenizer_files_names_them(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no tokenizer files.*spiece.model or tokenizer.json") as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_cuda_encode_then_offload():
    cpu = _text_encoder()
    gpu = TextEncoder(_random_encoder().to("cuda", torch.bfloat16), HashTokenizer(TINY.vocab_size), TINY.text_len)
    prompts = ["a cat on a roof", "a dog"]
    expected, _ = cpu.encode(prompts)
    embeddings, _ = gpu.encode(prompts)
    assert embeddings.device.type == "cuda" and embeddings.dtype == torch.bfloat16
    torch.testing.assert_close(embeddings.float().cpu(), expected, rtol=0.05, atol=0.05)
    gpu.offload()
    assert all(p.device.type == "cpu" for p in gpu.encoder.parameters())
    assert embeddings.device.type == "cuda"
