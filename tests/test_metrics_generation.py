"""FID / IS through torchmetrics with the world extractor (a tiny random CNN here), the cached
real statistics, and the standard-Inception path (random weights in the real file layout)."""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from modules.metrics import (
    INCEPTION_WEIGHTS_FILENAME,
    INCEPTION_WEIGHTS_URL,
    GenMetricsConfig,
    InceptionExtractor,
    WorldExtractor,
    build_feature_extractor,
    build_gen_metrics,
)


class TinyWorldClassifier(nn.Module):
    """Stand-in for the world's reference classifier: features(x) and per-head logits(x)."""

    def __init__(self, seed: int = 0, width: int = 16):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.body = nn.Sequential(
                nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(8, width, 3, stride=2, padding=1), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )
            self.shape_head = nn.Linear(width, 4)
            self.colour_head = nn.Linear(width, 6)
        self.num_features = width
        self.feature_calls = 0  # images seen by features(): the cache tests count these

    def features(self, x):
        self.feature_calls += x.shape[0]
        return self.body(x)

    def logits(self, x):
        f = self.body(x)
        return {"shape": self.shape_head(f), "colour": self.colour_head(f)}


def blob_images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """Smooth random colour fields in [0, 1] (less degenerate than white noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def make_cfg(tmp_path, **kw):
    base = dict(extractor="world", num_real_images=96, is_splits=1, real_dataset="world",
                cache_dir=str(tmp_path / "cache"))
    base.update(kw)
    return GenMetricsConfig(**base)


def batches(images, calls, bs=32):
    def fn():
        calls.append(1)
        return iter(images.split(bs))
    return fn


def test_fid_identical_near_zero_and_shifted_larger(tmp_path):
    reals = blob_images(96, seed=1)
    clf = TinyWorldClassifier()
    gm = build_gen_metrics(make_cfg(tmp_path), clf)
    calls = []
    assert gm.prepare_reals(batches(reals, calls)) is False  # nothing cached yet
    gm.update(reals[:50])
    gm.update(reals[50:])
    same = gm.compute()
    gm.reset()
    gm.update((reals * 0.6 + 0.3).clamp(0, 1))
    shifted = gm.compute()
    gm.reset()
    gm.update(blob_images(96, seed=2))  # same distribution, other samples
    other = gm.compute()
    assert abs(same["fid"].item()) < 1e-9
    assert shifted["fid"].item() > 1e-4
    assert shifted["fid"].item() > 10 * other["fid"].item() > 0
    assert set(same) == {"fid", "is_mean", "is_std"}
    proto = gm.protocol()
    assert proto["num_real_images"] == 96 and proto["num_fake_images"] == 96
    assert proto["extractor"]["kind"] == "world" and proto["feature_dim"] == 16


def test_world_extractor_works_as_plain_torchmetrics_feature(tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance

    reals, fakes = blob_images(64, seed=1), blob_images(64, seed=3)
    ex = WorldExtractor(TinyWorldClassifier())
    fid = FrechetInceptionDistance(feature=ex)  # num_features is set: no dummy 299 px forward
    fid.update(reals, real=True)
    fid.update(fakes, real=False)
    gm = build_gen_metrics(make_cfg(tmp_path, num_real_images=64), TinyWorldClassifier())
    gm.prepare_reals(lambda: [reals])
    gm.update(fakes)
    assert torch.allclose(fid.compute().double(), gm.compute()["fid"].double(), rtol=1e-5)


def test_real_statistics_are_cached_reused_and_invalidated(tmp_path):
    reals, fakes = blob_images(96, seed=1), blob_images(40, seed=4)
    cfg = make_cfg(tmp_path)
    clf = TinyWorldClassifier()
    calls = []

    gm1 = build_gen_metrics(cfg, clf)
    assert gm1.prepare_reals(batches(reals, calls)) is False
    assert clf.feature_calls == 96 and len(calls) == 1  # num_real_images honoured
    gm1.update(fakes)
    fid1 = gm1.compute()["fid"]
    cache_file = gm1.real_stats_path()
    assert cache_file.is_file()

    # Same setup, new object (a later validation / evaluate run): loaded, reals untouched.
    clf.feature_calls = 0
    gm2 = build_gen_metrics(cfg, clf)
    assert gm2.prepare_reals(batches(reals, calls)) is True
    assert clf.feature_calls == 0 and len(calls) == 1
    gm2.update(fakes)
    assert torch.equal(gm2.compute()["fid"], fid1)
    # reset() between validation epochs keeps the reals (reset_real_features=False).
    gm2.reset()
    gm2.update(fakes)
    assert torch.equal(gm2.compute()["fid"], fid1)

    # Different extractor weights -> different key -> recomputed.
    clf_b = TinyWorldClassifier(seed=1)
    gm3 = build_gen_metrics(cfg, clf_b)
    assert gm3.real_stats_path() != cache_file
    assert gm3.prepare_reals(batches(reals, calls)) is False
    assert clf_b.feature_calls == 96 and len(calls) == 2
    # Other resolution or reference split -> other key as well.
    gm4 = build_gen_metrics(make_cfg(tmp_path, resolution=16), clf)
    gm5 = build_gen_metrics(make_cfg(tmp_path, real_split="test"), clf)
    paths = {cache_file, gm3.real_stats_path(), gm4.real_stats_path(), gm5.real_stats_path()}
    assert len(paths) == 4
    assert len(os.listdir(cfg.cache_dir)) == 2


def test_resolution_resizes_inputs(tmp_path):
    clf = TinyWorldClassifier()
    ex = WorldExtractor(clf, resolution=16)
    big = blob_images(4, seed=5, size=64)
    small = F.interpolate(big, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(ex(big), ex(small), atol=1e-6)
    assert torch.allclose(ex((big * 255).to(torch.uint8)), ex(big), atol=2e-2)  # uint8 accepted


@pytest.mark.filterwarnings("ignore:std\\(\\)")  # one split: std is NaN
def test_inception_score_over_joint_heads():
    class OneHotClassifier(nn.Module):
        """Reads its 'prediction' from pixel (0, 0): confident, one class per combination."""

        num_features = 2

        def features(self, x):
            return x[:, :2, 0, 0]

        def logits(self, x):
            shape = (x[:, 0, 0, 0] * 3).round().long()
            colour = (x[:, 1, 0, 0] * 5).round().long()
            return {
                "shape": 50.0 * F.one_hot(shape, 4).float(),
                "colour": 50.0 * F.one_hot(colour, 6).float(),
            }

    from torchmetrics.image.inception import InceptionScore

    s, c = torch.meshgrid(torch.arange(4), torch.arange(6), indexing="ij")
    imgs = torch.zeros(24, 3, 4, 4)
    imgs[:, 0] = (s.reshape(-1) / 3.0)[:, None, None]
    imgs[:, 1] = (c.reshape(-1) / 5.0)[:, None, None]
    joint = WorldExtractor(OneHotClassifier())
    assert joint.logits(imgs).shape == (24, 24)
    with pytest.warns(UserWarning):
        score = InceptionScore(feature=joint.logits_view(), splits=1)
    score.update(imgs)
    assert score.compute()[0].item() == pytest.approx(24.0, rel=1e-3)
    only_shape = WorldExtractor(OneHotClassifier(), is_heads=["shape"])
    assert only_shape.logits(imgs).shape == (24, 4)
    with pytest.raises(KeyError, match="colour"):
        WorldExtractor(OneHotClassifier(), is_heads=["color"]).logits(imgs)


def test_config_validation_and_world_requirements(tmp_path):
    with pytest.raises(ValueError, match="valid choices: inception, world"):
        GenMetricsConfig(extractor="clip")
    schema = OmegaConf.structured(GenMetricsConfig)
    merged = OmegaConf.merge(schema, {"extractor": "inceptoin"})
    with pytest.raises(Exception, match="inceptoin"):
        OmegaConf.to_object(merged)
    ok = OmegaConf.to_object(OmegaConf.merge(schema, {"extractor": "world", "resolution": 32}))
    assert isinstance(ok, GenMetricsConfig) and ok.resolution == 32
    with pytest.raises(ValueError, match="world_classifier"):
        build_feature_extractor(make_cfg(tmp_path))
    with pytest.raises(TypeError, match="features"):
        build_feature_extractor(make_cfg(tmp_path), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="feature_dim=8"):
        build_feature_extractor(make_cfg(tmp_path, feature_dim=8), TinyWorldClassifier())


def test_missing_inception_weights_error_says_how_to_get_them(tmp_path):
    missing = tmp_path / "nope" / INCEPTION_WEIGHTS_FILENAME
    cfg = make_cfg(tmp_path, extractor="inception", inception_weights_path=str(missing))
    with pytest.raises(FileNotFoundError) as err:
        build_gen_metrics(cfg)
    msg = str(err.value)
    assert INCEPTION_WEIGHTS_URL in msg and str(missing) in msg
    assert "gen_metrics.inception_weights_path" in msg
    with pytest.raises(FileNotFoundError, match="inception_weights_path"):
        build_gen_metrics(make_cfg(tmp_path, extractor="inception"))  # empty path


def write_random_inception_weights(path):
    """torch-fidelity's InceptionV3 layout with random weights (the real file cannot ship)."""
    from torch_fidelity import feature_extractor_inceptionv3 as fi

    C = fi.BasicConv2d
    m = nn.Module()
    m.Conv2d_1a_3x3 = C(3, 32, kernel_size=3, stride=2)
    m.Conv2d_2a_3x3 = C(32, 32, kernel_size=3)
    m.Conv2d_2b_3x3 = C(32, 64, kernel_size=3, padding=1)
    m.Conv2d_3b_1x1 = C(64, 80, kernel_size=1)
    m.Conv2d_4a_3x3 = C(80, 192, kernel_size=3)
    m.Mixed_5b = fi.InceptionA(192, pool_features=32)
    m.Mixed_5c = fi.InceptionA(256, pool_features=64)
    m.Mixed_5d = fi.InceptionA(288, pool_features=64)
    m.Mixed_6a = fi.InceptionB(288)
    m.Mixed_6b = fi.InceptionC(768, channels_7x7=128)
    m.Mixed_6c = fi.InceptionC(768, channels_7x7=160)
    m.Mixed_6d = fi.InceptionC(768, channels_7x7=160)
    m.Mixed_6e = fi.InceptionC(768, channels_7x7=192)
    m.Mixed_7a = fi.InceptionD(768)
    m.Mixed_7b = fi.InceptionE_1(1280)
    m.Mixed_7c = fi.InceptionE_2(2048)
    m.fc = nn.Linear(2048, 1008)
    torch.save(m.state_dict(), path)


def test_inception_extractor_from_local_file(tmp_path):
    from torchmetrics.image.fid import NoTrainInceptionV3

    torch.manual_seed(0)
    path = tmp_path / INCEPTION_WEIGHTS_FILENAME
    write_random_inception_weights(path)
    cfg = make_cfg(tmp_path, extractor="inception", inception_weights_path=str(path))
    ex = build_feature_extractor(cfg)
    assert isinstance(ex, InceptionExtractor) and ex.num_features == 2048
    imgs = blob_images(3, seed=6)
    feats, logits = ex.features_and_logits(imgs)
    assert feats.shape == (3, 2048) and logits.shape == (3, 1008)
    # Same numbers as torchmetrics' own IS network (logits_unbiased, TF1-compatible resize).
    ref = NoTrainInceptionV3(
        name="inception-v3-compat", features_list=["logits_unbiased"],
        feature_extractor_weights_path=str(path), antialias=False,
    )
    assert torch.allclose(ref((imgs * 255).to(torch.uint8)), logits, atol=1e-5, rtol=1e-4)
    # Other weights in the same file -> other fingerprint -> other real-stats cache file.
    gm = build_gen_metrics(cfg)
    write_random_inception_weights(path)
    assert build_gen_metrics(cfg).real_stats_path() != gm.real_stats_path()
    # A file that needs unpickling of arbitrary objects is refused before torch-fidelity sees it.
    bad = tmp_path / "bad.pth"
    torch.save({"x": torch.nn.ReLU()}, bad)
    with pytest.raises(ValueError, match="weights_only"):
        InceptionExtractor(str(bad))
