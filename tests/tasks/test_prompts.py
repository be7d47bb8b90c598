"""Prompt templates (prompts/templates.py) and the text-embedding cache (prompts/embedding_cache.py)."""

from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path

import pytest
import torch
import yaml

from prompts.embedding_cache import EmbeddingCache
from prompts.templates import TemplateError, expand_template, write_manifest_csv
from tasks.manifest import read_manifest

REPO = Path(__file__).resolve().parents[2]


def write_yaml(path: Path, spec: object) -> Path:
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


# ── templates ───────────────────────────────────────────────────────────────────────────────────

def test_expand_is_the_cartesian_product(tmp_path: Path) -> None:
    animals, places = ["cat", "dog", "owl"], ["a garden", "the snow"]
    path = write_yaml(tmp_path / "t.yaml", {
        "template": "a {animal} in {place}, {animal} again",
        "variables": {"animal": animals, "place": places},
        "defaults": {"mode": "t2v", "model": "tiny-t2v", "num_frames": 9},
        "id_prefix": "x"})
    rows = expand_template(path)
    expected_prompts = [f"a {a} in {p}, {a} again" for a, p in itertools.product(animals, places)]
    assert [r["prompt"] for r in rows] == expected_prompts
    assert [r["id"] for r in rows] == [f"x-{i:04d}" for i in range(6)]
    assert all(r["mode"] == "t2v" and r["model"] == "tiny-t2v" and r["num_frames"] == 9 for r in rows)
    assert expand_template(path) == rows  # stable


def test_column_variables_set_the_column(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "t.yaml", {
        "template": "a {animal}", "variables": {"animal": ["cat"], "seed": [1, 2, 3]},
        "defaults": {"mode": "t2v", "seed": 0}})
    rows = expand_template(path)
    assert [(r["id"], r["seed"]) for r in rows] == [("prompt-0000", 1), ("prompt-0001", 2),
                                                    ("prompt-0002", 3)]


def test_written_csv_reads_back_as_a_valid_manifest(tmp_path: Path) -> None:
    rows = expand_template(REPO / "prompts" / "example.yaml")
    out = write_manifest_csv(rows, tmp_path / "sub" / "m.csv")
    manifest = read_manifest(out, env={})
    assert manifest.errors == [] and manifest.warnings == []
    assert [(r.id, r.prompt, r.seed) for r in manifest.rows] == [
        (row["id"], row["prompt"], row["seed"]) for row in rows]
    assert all(r.aspect_ratio == "16:9" and r.preview is True for r in manifest.rows)


def test_csv_writer_quotes_commas_and_newlines(tmp_path: Path) -> None:
    rows = [{"id": "a", "mode": "t2v", "prompt": 'one, "two"\nthree', "model": "tiny-t2v",
             "num_frames": 9, "preview": False, "upscale": None}]
    manifest = read_manifest(write_manifest_csv(rows, tmp_path / "m.csv"), env={})
    [row] = manifest.rows
    assert row.prompt == 'one, "two"\nthree' and row.preview is False and row.upscale is None


@pytest.mark.parametrize("spec, message", [
    ({"template": "a {animal} in {place}", "variables": {"animal": ["cat"]}}, "{place}"),
    ({"template": "a {animal}", "variables": {"animal": []}}, "no values (need a non-empty list): animal"),
    ({"template": "a {animal}", "variables": {"animal": "cat"}}, "no values"),
    ({"template": "a {animal}", "variables": {"animal": ["cat"], "colour": ["red"]}}, "not used in the template"),
    ({"template": "a {}", "variables": {}}, "plain names"),
    ({"template": "a {animal.name}", "variables": {"animal": ["cat"]}}, "{animal.name}"),
    ({"template": "a {animal", "variables": {"animal": ["cat"]}}, "not valid"),
    ({"template": "", "variables": {}}, "non-empty string"),
    ({"template": "x", "defaults": {"colour": "red"}}, "colour"),
    ({"template": "x", "defaults": {"id": "fixed"}}, "id"),
    ({"template": "x", "id_prefix": "../up"}, "id_prefix"),
    ({"template": "x", "extra": 1}, "unknown key(s): extra"),
    (["not", "a", "mapping"], "must be a mapping"),
])
def test_template_errors_name_the_problem(tmp_path: Path, spec: object, message: str) -> None:
    path = write_yaml(tmp_path / "t.yaml", spec)
    with pytest.raises(TemplateError) as caught:
        expand_template(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)


def test_braces_can_be_escaped(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "t.yaml", {"template": "{{literal}} {a}", "variables": {"a": ["x"]}})
    assert expand_template(path)[0]["prompt"] == "{literal} x"


# ── embedding cache ─────────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_put_get_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    cache = EmbeddingCache(tmp_path)
    tensor = torch.randn(7, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert cache.get("enc-a", "a cat") is None
    path = cache.put("enc-a", "a cat", tensor)
    assert path.parent.parent == tmp_path and path.name.startswith(path.parent.name)
    assert path.suffix == ".safetensors" and len(path.stem) == 64
    got = cache.get("enc-a", "a cat")
    assert got is not None and got.dtype == dtype and torch.equal(got, tensor)


def test_key_includes_encoder_prompt_and_text_len(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    cache.put("enc-a", "a cat", torch.ones(2, 4), text_len=32)
    assert cache.get("enc-a", "a cat", text_len=32) is not None
    assert cache.get("enc-b", "a cat", text_len=32) is None
    assert cache.get("enc-a", "a cat ", text_len=32) is None
    assert cache.get("enc-a", "a cat", text_len=512) is None
    assert cache.get("enc-a", "a cat") is None
    # a strided view is stored by value
    cache.put("enc-a", "view", torch.arange(12.0).reshape(3, 4).t())
    assert torch.equal(cache.get("enc-a", "view"), torch.arange(12.0).reshape(3, 4).t())


def test_unicode_prompts(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    for prompt in ("一只猫在花园里", "café ☕", "line\nbreak"):
        cache.put("enc", prompt, torch.full((1, 2), float(len(prompt))))
    for prompt in ("一只猫在花园里", "café ☕", "line\nbreak"):
        assert cache.get("enc", prompt)[0, 0].item() == len(prompt)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "foreign"])
def test_corrupt_files_are_a_miss_and_get_replaced(tmp_path: Path, damage: str) -> None:
    cache = EmbeddingCache(tmp_path)
    tensor = torch.randn(3, 8)
    path = cache.put("enc", "p", tensor)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 5])
    elif damage == "garbage":
        path.write_bytes(b"\x00garbage" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a valid file written for another key lands on this path
        other = EmbeddingCache(tmp_path / "other")
        path.write_bytes(other.put("enc", "another prompt", tensor).read_bytes())
    assert cache.get("enc", "p") is None
    cache.put("enc", "p", tensor)
    assert torch.equal(cache.get("enc", "p"), tensor)


def test_writes_are_atomic(tmp_path: Path) -> None:
    """Readers racing a writer see the old tensor or the new one, never a partial file."""
    cache = EmbeddingCache(tmp_path)
    big = [torch.full((256, 256), float(i)) for i in range(2)]
    cache.put("enc", "p", big[0])
    stop = threading.Event()
    seen: set[float] = set()
    bad: list[object] = []

    def reader() -> None:
        while not stop.is_set():
            got = cache.get("enc", "p")
            if got is None or not bool((got == got[0, 0]).all()):
                bad.append(got)
            else:
                seen.add(float(got[0, 0]))

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(40):
        cache.put("enc", "p", big[i % 2])
    stop.set()
    thread.join()
    assert bad == []
    assert seen <= {0.0, 1.0}
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".safetensors"]
    assert leftovers == []


def test_failed_write_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = EmbeddingCache(tmp_path)

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        cache.put("enc", "p", torch.ones(2))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
