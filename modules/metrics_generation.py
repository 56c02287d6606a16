"""FID and IS through torchmetrics, with a configurable feature extractor and cached real stats.

Two extractors, picked by ``GenMetricsConfig.extractor``:

  inception  the standard torch-fidelity InceptionV3 (the network torchmetrics' FID builds,
             ``NoTrainInceptionV3``), loaded from a local weights file, never downloaded:
             pool features (N, 2048) for FID, ``logits_unbiased`` (N, 1008) for IS. With
             ``inception_antialias: false`` (default) images are resized to 299 with
             torch-fidelity's TF1-compatible bilinear resize, so numbers follow the
             torch-fidelity convention (torchmetrics' own default, antialias=True, does not).
  world      a caller-supplied classifier of the embedded shape world (see ``WorldClassifier``):
             ``features(x)`` for FID, ``logits(x)`` for IS.

Images go in as (N, 3, H, W), float in [0, 1] or uint8 in [0, 255]; with ``resolution > 0``
both real and generated images are resized to resolution x resolution first (bilinear,
antialiased), so a reference set at another size is comparable and the protocol says so.

The extractor runs once per batch (``features_and_logits``); torchmetrics'
``FrechetInceptionDistance`` and ``InceptionScore`` then only accumulate the precomputed
features (their ``feature`` is a pass-through module). Real statistics (feature sum, sum of
outer products, count: exactly FID's ``real_features_*`` states) are computed once per (dataset,
split, extractor incl. a hash of its weights, resolution, number of real images) and stored under
``cache_dir``; a later run with the same key loads them instead of touching the real images.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Protocol, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from modules.checkpoint import sha256_file

INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    + INCEPTION_WEIGHTS_FILENAME
)
EXTRACTORS = ("inception", "world")
_CACHE_FORMAT = 1  # bump when the cached file layout or the feature pipeline changes
# torchmetrics FrechetInceptionDistance states that hold the real side (sums, so they cache).
_REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


@dataclass
class GenMetricsConfig:
    """How generated images are scored (FID / IS). OmegaConf-structured-config friendly."""

    extractor: str = "world"  # inception | world
    # inception: path of torch-fidelity's converted TF Inception weights (INCEPTION_WEIGHTS_URL).
    inception_weights_path: str = ""
    inception_antialias: bool = False  # False: torch-fidelity's TF1-compatible resize to 299
    # world: where the caller loaded the reference classifier from; recorded in the protocol.
    # The cache key hashes the classifier's actual weights, so a retrained classifier at the
    # same path still gets fresh real statistics.
    world_classifier_path: str = ""
    # Feature width D: 0 = take it from the extractor; otherwise it must match (inception: 2048).
    feature_dim: int = 0
    # IS classes for a world classifier with several heads: the joint distribution of these
    # heads (product of their softmaxes); empty = all heads.
    is_heads: List[str] = field(default_factory=list)
    resolution: int = 0  # >0: resize real and fake images to this square size first
    num_real_images: int = 10000  # reference set size (<=0: everything the iterator yields)
    num_fake_images: int = 10000  # how many images the evaluator generates (recorded)
    is_splits: int = 10
    real_dataset: str = ""  # reference set name, part of the cache key (e.g. "world")
    real_split: str = "val"
    cache_dir: str = ".cache/gen_metrics"

    def __post_init__(self) -> None:
        # Runs on OmegaConf.to_object too, so a typo fails at config load, not after training.
        if self.extractor not in EXTRACTORS:
            raise ValueError(
                f"gen_metrics.extractor: unknown extractor {self.extractor!r}; valid choices: "
                f"{', '.join(EXTRACTORS)}"
            )
        if self.resolution < 0 or self.is_splits < 1:
            raise ValueError(
                f"gen_metrics: resolution must be >= 0 and is_splits >= 1, got "
                f"{self.resolution}, {self.is_splits}"
            )


class WorldClassifier(Protocol):
    """What the world's reference classifier must offer to serve as FID/IS extractor.

    Inputs are float images in [0, 1], (N, 3, H, W); the classifier normalises internally.
    ``num_features`` (optional attribute) saves a dummy forward pass.
    """

    def features(self, x_N3HW: Tensor) -> Tensor:  # pooled features (N, D), for FID
        ...

    def logits(self, x_N3HW: Tensor) -> Union[Tensor, Mapping[str, Tensor]]:  # (N, K) or per head
        ...


def _to_float01(images: Tensor) -> Tensor:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images as (N, 3, H, W), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise TypeError(f"expected float images in [0, 1] or uint8, got dtype {images.dtype}")
    return images.float()


def _resize(x_N3HW: Tensor, resolution: int) -> Tensor:
    if resolution <= 0 or tuple(x_N3HW.shape[-2:]) == (resolution, resolution):
        return x_N3HW
    return F.interpolate(
        x_N3HW, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True
    )


def hash_state_dict(module: nn.Module) -> str:
    """sha256 over parameter/buffer names, dtypes, shapes and bytes: identifies the weights."""
    h = hashlib.sha256(type(module).__name__.encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class GenFeatureExtractor(nn.Module):
    """Common face of both extractors.

    ``forward(images) -> (N, D)`` features with ``num_features = D`` set, so an instance can be
    handed to ``torchmetrics.image.FrechetInceptionDistance(feature=...)`` directly;
    ``logits(images) -> (N, K)`` for IS (``logits_view()`` wraps it as a module for
    ``InceptionScore(feature=...)``); ``features_and_logits`` does both in one pass.
    ``fingerprint`` identifies the extractor and its weights (the real-stats cache key uses it).
    """

    kind: str = ""
    num_features: int
    fingerprint: str

    def features_and_logits(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        return self.features_and_logits(images)[0]

    def logits(self, images: Tensor) -> Tensor:
        return self.features_and_logits(images)[1]

    def logits_view(self) -> nn.Module:
        return _LogitsView(self)

    def train(self, mode: bool = True) -> "GenFeatureExtractor":
        # A metric network never leaves eval mode (BatchNorm/Dropout would change the numbers).
        return super().train(False)

    def _device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")


class _LogitsView(nn.Module):
    def __init__(self, extractor: GenFeatureExtractor):
        super().__init__()
        self.extractor = extractor

    def forward(self, images: Tensor) -> Tensor:
        return self.extractor.logits(images)


class _PassThrough(nn.Module):
    """torchmetrics ``feature`` module for features computed outside the metric."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


def missing_inception_weights_message(path: str) -> str:
    shown = path or "<empty>"
    target = path or f"/path/to/{INCEPTION_WEIGHTS_FILENAME}"
    return (
        f"Inception weights file not found: {shown} "
        f"(config key gen_metrics.inception_weights_path). The standard FID/IS Inception weights "
        f"are never downloaded at run time. Get torch-fidelity's converted TF-Inception file once "
        f"on a machine with network access:\n"
        f"    curl -L -o {target} {INCEPTION_WEIGHTS_URL}\n"
        f"(the same file torch-fidelity fetches into ~/.cache/torch/hub/checkpoints/), copy it "
        f"here and set gen_metrics.inception_weights_path to its path. For the embedded world use "
        f"gen_metrics.extractor=world instead."
    )


class InceptionExtractor(GenFeatureExtractor):
    """Standard InceptionV3 (torchmetrics' ``NoTrainInceptionV3``) from a local weights file.

    Features: 2048-d pool; logits: ``logits_unbiased`` (pool @ fc.weight.T, 1008 classes), what
    torch-fidelity and torchmetrics use for IS. Images become uint8 before the network, as
    torchmetrics does for ``normalize=True`` (float x -> (x * 255) truncated).
    """

    kind = "inception"

    def __init__(self, weights_path: str, resolution: int = 0, antialias: bool = False):
        super().__init__()
        if not weights_path or not os.path.isfile(weights_path):
            raise FileNotFoundError(missing_inception_weights_message(weights_path))
        # torch-fidelity loads the file with weights_only=False; refuse anything that is not a
        # plain tensor state dict before it gets there.
        try:
            torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - report any unreadable / unsafe file the same way
            raise ValueError(
                f"{weights_path}: not a plain state dict loadable with weights_only=True ({e}); "
                f"expected {INCEPTION_WEIGHTS_FILENAME} from {INCEPTION_WEIGHTS_URL}"
            ) from e
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=weights_path,
            antialias=antialias,
        )
        self.net.requires_grad_(False)
        self.resolution = resolution
        self.num_features = 2048
        self.fingerprint = json.dumps(
            {"kind": self.kind, "weights_sha256": sha256_file(weights_path), "feature": "2048",
             "logits": "logits_unbiased", "antialias": antialias, "uint8": "truncate"},
            sort_keys=True,
        )

    @torch.no_grad()
    def features_and_logits(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        images = images.to(self._device())
        if images.dtype == torch.uint8 and self.resolution <= 0:
            x_u8 = images
        else:
            x = _resize(_to_float01(images), self.resolution)
            x_u8 = (x.clamp(0.0, 1.0) * 255).to(torch.uint8)
        feats_N2048 = self.net(x_u8).float()
        logits_N1008 = feats_N2048 @ self.net.fc.weight.float().T
        return feats_N2048, logits_N1008


class WorldExtractor(GenFeatureExtractor):
    """Wraps the world's reference classifier (see ``WorldClassifier``) for FID / IS.

    The classifier is frozen (``requires_grad_(False)``) and kept in eval mode: it is a fixed
    measuring instrument. With per-head logits, IS classes are the joint outcomes of ``is_heads``
    (all heads when empty): log p(a, b, ...) = log p(a) + log p(b) + ..., flattened.
    """

    kind = "world"

    def __init__(
        self,
        classifier: nn.Module,
        resolution: int = 0,
        feature_dim: int = 0,
        is_heads: Iterable[str] = (),
    ):
        super().__init__()
        for method in ("features", "logits"):
            if not callable(getattr(classifier, method, None)):
                raise TypeError(
                    f"world classifier {type(classifier).__name__} has no {method}() method; the "
                    f"FID/IS extractor needs features(x) -> (N, D) and logits(x) -> (N, K) or a "
                    f"dict of per-head logits (modules.metrics.WorldClassifier)"
                )
        self.classifier = classifier.eval().requires_grad_(False)
        self.resolution = resolution
        self.is_heads = list(is_heads)
        dim = getattr(classifier, "num_features", None)
        if dim is None:
            dim = feature_dim
        if not dim:
            probe = torch.rand(1, 3, resolution or 64, resolution or 64, device=self._device())
            with torch.no_grad():
                dim = int(classifier.features(probe).shape[-1])
        if feature_dim and int(dim) != feature_dim:
            raise ValueError(
                f"gen_metrics.feature_dim={feature_dim} but the world classifier gives "
                f"{dim}-d features"
            )
        self.num_features = int(dim)
        self.fingerprint = json.dumps(
            {"kind": self.kind, "class": type(classifier).__name__,
             "weights_sha256": hash_state_dict(classifier), "is_heads": self.is_heads},
            sort_keys=True,
        )

    def _joint_log_probs(self, logits: Mapping[str, Tensor]) -> Tensor:
        heads = self.is_heads or sorted(logits)
        unknown = [h for h in heads if h not in logits]
        if unknown:
            raise KeyError(
                f"gen_metrics.is_heads names {unknown}, but the classifier's heads are "
                f"{sorted(logits)}"
            )
        joint_NK = None
        for h in heads:
            lp_NC = logits[h].float().log_softmax(dim=-1)
            if joint_NK is None:
                joint_NK = lp_NC
            else:
                joint_NK = (joint_NK[:, :, None] + lp_NC[:, None, :]).flatten(1)
        return joint_NK  # softmax of a normalised log-distribution is that distribution

    @torch.no_grad()
    def features_and_logits(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        x = _resize(_to_float01(images.to(self._device())), self.resolution)
        feats_ND = self.classifier.features(x).float()
        logits = self.classifier.logits(x)
        if isinstance(logits, Mapping):
            logits_NK = self._joint_log_probs(logits)
        else:
            logits_NK = logits.float()
        return feats_ND, logits_NK


def build_feature_extractor(
    cfg: GenMetricsConfig, world_classifier: Optional[nn.Module] = None
) -> GenFeatureExtractor:
    """The extractor ``cfg.extractor`` names; ``world`` needs the classifier module."""
    if cfg.extractor == "inception":
        if cfg.feature_dim not in (0, 2048):
            raise ValueError(
                f"gen_metrics.feature_dim={cfg.feature_dim}: the inception extractor gives 2048-d "
                f"pool features (set 0 or 2048)"
            )
        return InceptionExtractor(
            cfg.inception_weights_path, cfg.resolution, cfg.inception_antialias
        )
    if cfg.extractor == "world":
        if world_classifier is None:
            raise ValueError(
                "gen_metrics.extractor=world needs the world reference classifier: pass "
                "world_classifier= (built from gen_metrics.world_classifier_path by the caller)"
            )
        return WorldExtractor(world_classifier, cfg.resolution, cfg.feature_dim, cfg.is_heads)
    raise ValueError(
        f"gen_metrics.extractor: unknown {cfg.extractor!r}; valid choices: {', '.join(EXTRACTORS)}"
    )


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "none"


def _first_tensor(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(
        f"real image batches must be a Tensor (N, 3, H, W) or a tuple/list starting with one, "
        f"got {type(batch).__name__}"
    )


def _dist_rank_world() -> Tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GenerationMetrics(nn.Module):
    """FID (+ IS) of generated images against cached real statistics.

    >>> gm = build_gen_metrics(cfg, world_classifier=clf)
    >>> gm.prepare_reals(lambda: real_batches())   # once; loads the cache when it exists
    >>> for fake_N3HW in generated: gm.update(fake_N3HW)
    >>> gm.compute()   # {"fid": tensor, "is_mean": tensor, "is_std": tensor}; then gm.reset()

    ``reset()`` clears the generated side only. Under torch.distributed each rank feeds its own
    generated images and ``compute()`` gathers them; the real statistics are computed (on a cache
    miss) by rank 0 alone, and kept only on rank 0 so the sum-reduction counts them once.
    """

    def __init__(self, cfg: GenMetricsConfig, extractor: GenFeatureExtractor):
        super().__init__()
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.inception import InceptionScore

        self.cfg = cfg
        self.extractor = extractor
        d = extractor.num_features
        self.fid = FrechetInceptionDistance(feature=_PassThrough(d), reset_real_features=False)
        with warnings.catch_warnings():
            # "InceptionScore will save all extracted features": expected, logits are small.
            warnings.filterwarnings("ignore", message=".*save all extracted features.*")
            self.inception_score = InceptionScore(feature=_PassThrough(0), splits=cfg.is_splits)
        self.reals_ready = False
        self.reals_from_cache: Optional[bool] = None

    # ----- real statistics -------------------------------------------------------------
    def real_stats_key(
        self, dataset: Optional[str] = None, split: Optional[str] = None
    ) -> Dict[str, Any]:
        return {
            "format": _CACHE_FORMAT,
            "dataset": self.cfg.real_dataset if dataset is None else dataset,
            "split": self.cfg.real_split if split is None else split,
            "extractor": json.loads(self.extractor.fingerprint),
            "resolution": self.cfg.resolution,
            "num_real_images": self.cfg.num_real_images,
        }

    def real_stats_path(self, dataset: Optional[str] = None, split: Optional[str] = None) -> Path:
        key = self.real_stats_key(dataset, split)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        name = (
            f"{_slug(key['dataset'])}-{_slug(key['split'])}-{self.extractor.kind}"
            f"-r{key['resolution']}-n{key['num_real_images']}-{digest}.pt"
        )
        return Path(self.cfg.cache_dir) / name

    @torch.no_grad()
    def _extract_reals(self, real_images_fn: Callable[[], Iterable[Any]]) -> Dict[str, Tensor]:
        """Run the extractor over the real images; returns FID's real_features_* states."""
        d = self.extractor.num_features
        sum_D = torch.zeros(d, dtype=torch.float64)
        cov_sum_DD = torch.zeros(d, d, dtype=torch.float64)
        n = 0
        limit = self.cfg.num_real_images if self.cfg.num_real_images > 0 else None
        for batch in real_images_fn():
            x = _first_tensor(batch)
            if limit is not None:
                x = x[: limit - n]
            if x.shape[0] == 0:
                break
            f_ND = self.extractor(x).double().cpu()
            sum_D += f_ND.sum(0)
            cov_sum_DD += f_ND.T @ f_ND
            n += x.shape[0]
            if limit is not None and n >= limit:
                break
        if n < 2:
            raise RuntimeError(f"real image iterator gave {n} images; FID needs at least 2")
        if limit is not None and n < limit:
            warnings.warn(
                f"gen_metrics: asked for {limit} real images, the iterator gave {n}; "
                f"statistics use {n} (recorded in the protocol)"
            )
        return {
            "real_features_sum": sum_D,
            "real_features_cov_sum": cov_sum_DD,
            "real_features_num_samples": torch.tensor(n, dtype=torch.long),
        }

    def _save(self, path: Path, key: Dict[str, Any], stats: Dict[str, Tensor]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"key_json": json.dumps(key, sort_keys=True), **stats}, tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file

    def _load(self, path: Path, key: Dict[str, Any]) -> Dict[str, Tensor]:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("key_json") != json.dumps(key, sort_keys=True):
            raise RuntimeError(
                f"{path}: cached real statistics were made for another setup; delete the file"
            )
        d = self.extractor.num_features
        if tuple(blob["real_features_cov_sum"].shape) != (d, d):
            raise RuntimeError(f"{path}: cached statistics are not {d}-d; delete the file")
        return {k: blob[k] for k in _REAL_STATES}

    def prepare_reals(
        self,
        real_images_fn: Callable[[], Iterable[Any]],
        dataset: Optional[str] = None,
        split: Optional[str] = None,
        refresh: bool = False,
    ) -> bool:
        """Load the real statistics from the cache, or compute and cache them.

        ``real_images_fn()`` returns an iterable of (N, 3, H, W) batches (or tuples starting with
        one); it is only called on a cache miss, for the first ``cfg.num_real_images`` images.
        Returns True when the statistics came from the cache.
        """
        key = self.real_stats_key(dataset, split)
        path = self.real_stats_path(dataset, split)
        rank, _ = _dist_rank_world()
        from_cache = path.is_file() and not refresh
        if rank == 0:
            if not from_cache:
                self._save(path, key, self._extract_reals(real_images_fn))
            stats = self._load(path, key)
        else:
            # Metric states are summed across ranks at compute(): only rank 0 holds the reals,
            # so other ranks neither wait for nor read the cache (which may be node-local).
            stats = {k: torch.zeros_like(getattr(self.fid, k)) for k in _REAL_STATES}
        for name, value in stats.items():
            current = getattr(self.fid, name)
            setattr(self.fid, name, value.to(device=current.device, dtype=current.dtype))
        self.reals_ready = True
        self.reals_from_cache = from_cache
        return from_cache

    # ----- generated images ------------------------------------------------------------
    def update(self, fake_images: Tensor) -> None:
        feats_ND, logits_NK = self.extractor.features_and_logits(fake_images)
        self.fid.update(feats_ND, real=False)
        self.inception_score.update(logits_NK)

    def compute(self) -> Dict[str, Tensor]:
        if not self.reals_ready:
            raise RuntimeError("GenerationMetrics.compute(): call prepare_reals() first")
        with warnings.catch_warnings():
            # is_splits=1 has no spread: std is NaN by definition, torch warns about it.
            warnings.filterwarnings("ignore", message=".*degrees of freedom.*")
            is_mean, is_std = self.inception_score.compute()
        return {"fid": self.fid.compute(), "is_mean": is_mean, "is_std": is_std}

    def reset(self) -> None:
        self.fid.reset()  # reset_real_features=False: the reals stay
        self.inception_score.reset()

    def protocol(self) -> Dict[str, Any]:
        """What produced the numbers; log it beside every FID/IS result."""
        return {
            "extractor": json.loads(self.extractor.fingerprint),
            "weights_path": (
                self.cfg.inception_weights_path
                if self.extractor.kind == "inception"
                else self.cfg.world_classifier_path
            ),
            "feature_dim": self.extractor.num_features,
            "resolution": self.cfg.resolution,
            "resize": "bilinear-antialias" if self.cfg.resolution > 0 else "none",
            "real_dataset": self.cfg.real_dataset,
            "real_split": self.cfg.real_split,
            "num_real_images_requested": self.cfg.num_real_images,
            "num_real_images": int(self.fid.real_features_num_samples),
            "num_fake_images": int(self.fid.fake_features_num_samples),
            "is_splits": self.cfg.is_splits,
            "real_stats_file": str(self.real_stats_path()),
        }


def build_gen_metrics(
    cfg: GenMetricsConfig, world_classifier: Optional[nn.Module] = None
) -> GenerationMetrics:
    """GenerationMetrics with the extractor cfg.extractor names (see build_feature_extractor)."""
    return GenerationMetrics(cfg, build_feature_extractor(cfg, world_classifier))
