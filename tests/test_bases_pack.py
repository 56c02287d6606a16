"""experiments.bases pack / check: the shipped-bases manifest, all at once or one retrained base."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments.bases import PARTS, check, pack
from modules.checkpoint import read_state_dict, save_state_dict


def _fake_bases(src: Path, scale: float = 1.0) -> None:
    for rel, keep in PARTS.values():
        key = (keep[0] if keep else "") + "w"
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        save_state_dict({key: torch.full((2, 3), scale), "drop_me" if keep else "b": torch.ones(1)}, src / rel)
    (src / "tokenizer").mkdir(parents=True, exist_ok=True)
    (src / "tokenizer" / "tokenizer.json").write_text("{}")


def test_pack_all_then_one_base(tmp_path):
    src, dst = tmp_path / "bases", tmp_path / "assets"
    _fake_bases(src)
    full = pack(src, dst)
    assert check(dst) == []
    assert set(full) >= set(PARTS) | {"tokenizer"}
    assert list(read_state_dict(dst / "llava.safetensors")) == ["llm.w"]  # only the kept prefixes
    assert read_state_dict(dst / "var.safetensors")["w"].dtype == torch.float16

    _fake_bases(src, scale=2.0)  # every base changed under runs/bases, only var repacked
    one = pack(src, dst, only=["var"])
    assert check(dst) == []
    assert one["var"]["sha256"] != full["var"]["sha256"]
    assert {k: v for k, v in one.items() if k not in ("var", "_created")} == \
        {k: v for k, v in full.items() if k not in ("var", "_created")}
    assert float(read_state_dict(dst / "var.safetensors")["w"][0, 0]) == 2.0
    assert float(read_state_dict(dst / "vqvae.safetensors")["w"][0, 0]) == 1.0
    assert json.loads((dst / "MANIFEST.json").read_text()) == one


def test_pack_names_what_is_missing_or_unknown(tmp_path):
    with pytest.raises(SystemExit, match="unknown base.*'vae'.*valid: llm"):
        pack(tmp_path, tmp_path / "a", only=["vae"])
    with pytest.raises(SystemExit, match=r"(?s)missing .*var/model.safetensors.*make bases"):
        pack(tmp_path, tmp_path / "a", only=["var"])


def test_the_same_weights_write_the_same_bytes(tmp_path):
    """safetensors orders the metadata by a per-process hash map: without sorting the header, the
    same weights and metadata gave files with other sha256 (7 of 8 saves differed), so a rebuilt
    base could never match its manifest."""
    import hashlib

    from safetensors import safe_open

    sd = {"b.weight": torch.arange(6.0).view(2, 3), "a.bias": torch.ones(3, dtype=torch.float16)}
    meta = {"source": "vision/model.safetensors", "dtype": "float16", "commit": "abc", "seed": "0"}
    digests = set()
    for i in range(8):
        save_state_dict(sd, tmp_path / f"{i}.safetensors", metadata=meta)
        digests.add(hashlib.sha256((tmp_path / f"{i}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:
        assert f.metadata() == meta and sorted(f.keys()) == ["a.bias", "b.weight"]
    back = read_state_dict(tmp_path / "0.safetensors")
    assert all(torch.equal(back[k], v) for k, v in sd.items())
    # the sharded writer (released-layout exports) goes through the same header sort
    from modules.checkpoint import save_sharded_safetensors

    items = [(k, v, v.dtype) for k, v in sd.items()]
    shards = set()
    for i in range(8):
        index = save_sharded_safetensors(items, tmp_path / f"sharded{i}", metadata=meta)
        shards.add(hashlib.sha256((index.parent / "model-00001-of-00001.safetensors").read_bytes()).hexdigest())
    assert len(shards) == 1
