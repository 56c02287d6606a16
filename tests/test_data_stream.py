"""Streams: weighted mixing with workers, finite ordered passes without duplicates, seeding,
unreadable samples counted, and the LightningDataModule wiring."""
import os

import pytest
from torch.utils.data import DataLoader

from datamodules.config import DataConfig, SourceConfig
from datamodules.schema import ShardSample, ShardWriter, write_manifest
from datamodules.stream import ShardStream, expand_shards
from datamodules.testing import solid_png


def write_source(d, prefix, n_shards, per_shard, gen=False, corrupt=()):
    w = ShardWriter(str(d), prefix, per_shard)
    for i in range(n_shards * per_shard):
        key = f"{prefix}_{i:05d}"
        msgs = ([{"role": "user", "content": f"draw {i}"}, {"role": "assistant", "content": "<image_gen>"}] if gen else
                [{"role": "user", "content": f"<image>\nq {i}"}, {"role": "assistant", "content": f"a {i}"}])
        png = solid_png((i % 256, 0, 0), 8)
        if i in corrupt:
            png = png[:20]  # truncated image: the reader must report it
        rec = {"id": key, "task": prefix, "source": "test", "messages": msgs, "images": ["img0.png"]}
        w.write(ShardSample(key, rec, {"img0.png": png}))
    write_manifest(str(d), w.close(), source="test")
    return str(d / f"{prefix}-*.tar")


def keys_of(batch):
    return [(s["source"], s["key"], s["n_unreadable"]) for s in batch]


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    a = write_source(d, "und", 4, 25)
    b = write_source(d, "gen", 3, 20, gen=True)
    return a, b


def test_expand_shards_glob_and_braces(two_sources, tmp_path):
    a, b = two_sources
    root = os.path.dirname(a)
    assert len(expand_shards(a)) == 4 and len(expand_shards("{und,gen}-*.tar", root)) == 7
    assert expand_shards(os.path.join(root, "und-00000{0,1}.tar")) == [os.path.join(root, f"und-00000{i}.tar") for i in (0, 1)]
    with pytest.raises(FileNotFoundError, match="matches no files"):
        ShardStream([SourceConfig("x", str(tmp_path / "nothing-*.tar"))])


def test_two_worker_mix_delivers_the_configured_ratio(two_sources):
    a, b = two_sources
    ds = ShardStream([SourceConfig("und", a, 3.0), SourceConfig("gen", b, 1.0, "generation")], "train", seed=0,
                     shuffle_buffer=30)
    got = []
    for batch in DataLoader(ds, batch_size=40, num_workers=2, collate_fn=keys_of):
        got += batch
        if len(got) >= 3200:
            break
    n = len(got)
    frac = sum(s == "und" for s, _, _ in got) / n
    sigma = (0.75 * 0.25 / n) ** 0.5
    assert abs(frac - 0.75) < 4 * sigma, frac
    # both workers contributed (different streams, not one stream twice)
    first = [k for _, k, _ in got[:80]]
    assert len(set(first)) > 60


def test_training_stream_is_reproducible(two_sources):
    a, b = two_sources
    srcs = [SourceConfig("und", a, 1.0), SourceConfig("gen", b, 1.0, "generation")]

    def take(seed, nw):
        out = []
        for batch in DataLoader(ShardStream(srcs, "train", seed=seed, shuffle_buffer=16), batch_size=10,
                                num_workers=nw, collate_fn=keys_of):
            out += [k for _, k, _ in batch]
            if len(out) >= 120:
                return out

    assert take(0, 2) == take(0, 2)
    assert take(0, 0) == take(0, 0)
    assert take(0, 2) != take(1, 2)


@pytest.mark.parametrize("nw,world", [(2, 1), (2, 2), (0, 3)])
def test_finite_pass_sees_every_sample_once(two_sources, nw, world):
    a, b = two_sources
    all_keys = [f"und_{i:05d}" for i in range(100)] + [f"gen_{i:05d}" for i in range(60)]
    # 7 shards dealt to 2, 4 or 3 consumers (ranks x workers); fewer shards than consumers: below
    seen = []
    for rank in range(world):
        ds = ShardStream([SourceConfig("und", a), SourceConfig("gen", b, 1.0, "generation")], "eval",
                         rank=rank, world_size=world)
        for batch in DataLoader(ds, batch_size=16, num_workers=nw, collate_fn=keys_of):
            seen += [k for _, k, _ in batch]
    assert len(seen) == len(set(seen)) == 160 and set(seen) == set(all_keys)
    if world == 1 and nw == 0:
        assert seen == all_keys  # ordered


def test_finite_pass_with_fewer_shards_than_consumers(tmp_path):
    pattern = write_source(tmp_path, "one", 1, 37)
    seen = []
    for rank in range(2):
        ds = ShardStream([SourceConfig("one", pattern, 1.0, "vqa_eval")], "eval", rank=rank, world_size=2)
        for batch in DataLoader(ds, batch_size=5, num_workers=2, collate_fn=keys_of):
            seen += [k for _, k, _ in batch]
    assert sorted(seen) == [f"one_{i:05d}" for i in range(37)]


def test_finite_training_epoch_has_no_duplicates(two_sources):
    a, b = two_sources
    ds = ShardStream([SourceConfig("und", a), SourceConfig("gen", b, 1.0, "generation")], "train", seed=0,
                     resampled=False, shuffle_buffer=10)
    seen = []
    for batch in DataLoader(ds, batch_size=16, num_workers=2, collate_fn=keys_of):
        seen += [k for _, k, _ in batch]
    assert len(seen) == len(set(seen)) == 160


def test_unreadable_samples_are_counted_not_silently_dropped(tmp_path, caplog):
    pattern = write_source(tmp_path, "bad", 1, 10, corrupt={3, 7})
    ds = ShardStream([SourceConfig("bad", pattern)], "eval")
    got = [s for batch in DataLoader(ds, batch_size=4, num_workers=0, collate_fn=keys_of) for s in batch]
    assert len(got) == 8 and sum(n for _, _, n in got) == 2
    assert "bad_00003" in caplog.text and "unreadable" in caplog.text


def test_collated_stream_from_world_shards(tmp_path):
    from datamodules import world
    from datamodules.collate import Collator
    from tests.tiny import tiny_tokenizer
    from datamodules.transforms import GenTransform
    from modules.components.vision_encoders import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform

    world.generate_split(str(tmp_path), "train", {"vqa": 40, "gen": 40}, size=32, shard_size=20)
    tok = tiny_tokenizer()
    col = Collator(tok, 4, 14, ImageTransform(16, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "crop"), GenTransform(32), max_length=256,
                   gen_patch_nums=(1, 2, 3), prompt_dropout=0.1)
    ds = ShardStream([SourceConfig("und", str(tmp_path / "vqa-*.tar"), 1.0),
                      SourceConfig("gen", str(tmp_path / "gen-*.tar"), 1.0, "generation")], "train", shuffle_buffer=8)
    for i, b in enumerate(DataLoader(ds, batch_size=8, num_workers=2, collate_fn=col)):
        n_und = sum(t == "understanding" for t in b["task"])
        assert b["pixel_values"].shape == (n_und, 3, 16, 16)
        if n_und < 8:
            assert b["gen_images"].shape == (8 - n_und, 3, 32, 32)
        else:
            assert "gen_images" not in b
        assert ((b["labels"] != -100).sum(1) > 0).all()
        if i == 5:
            break


def test_datamodule_wiring(two_sources):
    pytest.importorskip("lightning")
    from datamodules.datamodule import VargptDataModule

    a, b = two_sources
    cfg = DataConfig(sources=[SourceConfig("und", a, 1.0), SourceConfig("gen", b, 1.0, "generation")],
                     val_sources=[SourceConfig("val", b, 1.0, "vqa_eval")], batch_size=8, num_workers=0)
    dm = VargptDataModule(cfg, keys_of)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == 8
    val = [k for batch in dm.val_dataloader() for _, k, _ in batch]
    assert len(val) == 60 == len(set(val))
    with pytest.raises(ValueError, match=r"data.sources\[0\].*task"):
        VargptDataModule(DataConfig(sources=[SourceConfig("x", a, 1.0, "bogus")]), keys_of)
