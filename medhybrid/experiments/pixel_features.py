"""DDPM pixel features + MLP ensemble (Baranchuk et al., "Label-Efficient Semantic Segmentation with
Diffusion Models", ICLR 2022), on a frozen medhybrid U-Net.

Paper, section 3-4, and the defaults kept here:

- features: the image is noised to a few levels early in the chain, ``x_t = x_0 + sigma * eps`` with
  ``eps`` fixed (one seeded draw per level, the same for every image, so features are reproducible);
  decoder activations of the frozen network at each level are upsampled bilinearly to the image size and
  concatenated into one vector per pixel. The paper uses t = {50, 150, 250} of a 1000-step linear DDPM
  schedule; in EDM's sigma (``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)``) that is about
  0.18, 0.52 and 0.96, hence the default ``sigmas = (0.2, 0.5, 1.0)``.
- classifier: an ensemble of ``members = 10`` MLPs (two hidden layers, 256 and 128 units, ReLU and batch
  norm), each trained with Adam (lr 1e-3) on batches of labelled pixels with its own seed, stopped early
  when the epoch's training loss stops improving; prediction by majority vote.
- uncertainty: the entropy of the members' votes (0 = unanimous, 1 = evenly split), per pixel.

Memory: features are computed a few images at a time and the training pixels subsampled to at most
``max_pixels`` (stored as float16), so the training set takes ``max_pixels * n_features * 2`` bytes
(logged); a 50-image budget at 128 px fits in a few GiB by construction.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from monai.data import Dataset
from pydantic import Field
from torch import nn

from medhybrid.core import tracking
from medhybrid.core.config import NoiseLevels, StrictModel, dump_config
from medhybrid.data.datasets import few_shot_pairs
from medhybrid.data.specs import Preprocess
from medhybrid.data.transforms import IGNORE_INDEX, preprocessing
from medhybrid.networks.checkpoints import atomic_save, load_model, read_model_file
from medhybrid.networks.nets import EDMPrecond, ModelConfig
from medhybrid.workflows.fewshot import FewShotRunConfig, claim_few_shot_run, open_few_shot_run, require_channels

log = logging.getLogger("medhybrid")


class FeatureConfig(StrictModel):
    """Which activations of the frozen U-Net make the pixel features."""

    sigmas: NoiseLevels = Field((0.2, 0.5, 1.0), description="noise levels (EDM sigma); the paper's DDPM "
                                      "t = 50, 150, 250 of 1000")
    blocks: tuple[int, ...] | None = Field(None, description="decoder blocks (indices into the backbone's "
                                           "up_blocks, 0 = deepest); None = all")
    noise_seed: int = Field(0, description="seed of the fixed noise, one draw per level")
    chunk: int = Field(8, ge=1, description="images per forward pass")


class EnsembleConfig(StrictModel):
    """The per-pixel MLP ensemble and its training (paper defaults, except the pixel batch: 64 in the
    paper, larger here because CPU steps are dominated by overhead)."""

    members: int = Field(10, ge=1)
    hidden: tuple[int, ...] = (256, 128)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(256, ge=2)
    max_epochs: int = Field(20, ge=1)
    patience: int = Field(2, ge=1, description="epochs without a relative improvement of min_delta before stopping")
    min_delta: float = Field(1e-3, ge=0)
    max_pixels: int = Field(200_000, ge=100, description="labelled pixels kept for training (subsampled evenly per image)")


class PixelFeatures(nn.Module):
    """Frozen feature extractor: ``forward(x (B, C, H, W)) -> (B, n_features, H, W)``."""

    def __init__(self, net: EDMPrecond, cfg: FeatureConfig | None = None):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.cfg = cfg or FeatureConfig()
        ups = self.net.backbone.up_blocks
        self.blocks = tuple(range(len(ups))) if self.cfg.blocks is None else tuple(self.cfg.blocks)
        bad = [b for b in self.blocks if not -len(ups) <= b < len(ups)]
        if bad:
            raise ValueError(f"feature blocks {bad} do not exist: the backbone has {len(ups)} decoder blocks (0..{len(ups) - 1})")
        self._acts: dict[int, torch.Tensor] = {}
        self._noise: torch.Tensor | None = None

    def noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The fixed noise, (n_levels, C, H, W): one seeded draw per level, shared by every image."""
        if self._noise is None or tuple(self._noise.shape[1:]) != tuple(shape):
            g = torch.Generator().manual_seed(self.cfg.noise_seed)
            self._noise = torch.randn((len(self.cfg.sigmas), *shape), generator=g)
        return self._noise

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = next(self.net.parameters()).device
        x = x.to(dev).float()
        ups = self.net.backbone.up_blocks
        feats = []
        handles = [ups[b].register_forward_hook(self._hook(b)) for b in self.blocks]
        try:
            for sigma, eps in zip(self.cfg.sigmas, self.noise(tuple(x.shape[1:])).to(dev), strict=True):
                self._acts.clear()
                self.net(x + sigma * eps, sigma)
                for b in self.blocks:
                    a = self._acts[b].float()
                    feats.append(F.interpolate(a, size=x.shape[-2:], mode="bilinear", align_corners=False))
        finally:
            for h in handles:
                h.remove()
        return torch.cat(feats, dim=1)

    def _hook(self, b: int):
        def hook(_module, _inp, out):
            self._acts[b] = out[0] if isinstance(out, tuple) else out

        return hook


def pixel_mlp(n_features: int, num_classes: int, hidden: tuple[int, ...] = (256, 128)) -> nn.Sequential:
    """The paper's per-pixel classifier: Linear -> ReLU -> BatchNorm per hidden layer, then Linear."""
    layers: list[nn.Module] = []
    d = n_features
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU(), nn.BatchNorm1d(h)]
        d = h
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers)


class MLPEnsemble(nn.Module):
    """``members`` pixel MLPs; :meth:`votes` counts their argmax votes per class."""

    def __init__(self, n_features: int, num_classes: int, members: int = 10, hidden: tuple[int, ...] = (256, 128)):
        super().__init__()
        self.num_classes = num_classes
        self.members = nn.ModuleList(pixel_mlp(n_features, num_classes, hidden) for _ in range(members))

    @torch.no_grad()
    def votes(self, feats: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """``feats`` (N, F) -> vote counts (N, K) (each row sums to the number of members)."""
        self.eval()
        out = torch.zeros(feats.shape[0], self.num_classes)
        for s in range(0, feats.shape[0], chunk):
            f = feats[s : s + chunk].float()
            for m in self.members:
                out[s : s + chunk] += F.one_hot(m(f).argmax(1), self.num_classes).float().cpu()
        return out


def majority_vote(votes: torch.Tensor) -> torch.Tensor:
    """Class with the most votes (ties go to the lower class index)."""
    return votes.argmax(-1)


def vote_entropy(votes: torch.Tensor) -> torch.Tensor:
    """Entropy of the vote distribution, normalised to [0, 1] by log(K)."""
    p = votes / votes.sum(-1, keepdim=True).clamp(min=1)
    h = -(p * p.clamp(min=1e-12).log()).sum(-1)
    return h / math.log(votes.shape[-1])


def train_member(model: nn.Module, feats: torch.Tensor, labels: torch.Tensor, cfg: EnsembleConfig, seed: int) -> dict:
    """Adam on shuffled pixel batches until the epoch loss stops improving (relative ``min_delta`` for
    ``patience`` epochs) or ``max_epochs``. Returns the loss history."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model.train()
    best, stale, history = math.inf, 0, []
    n = feats.shape[0]
    for _epoch in range(cfg.max_epochs):
        perm = torch.randperm(n, generator=g)
        total = 0.0
        for s in range(0, n - 1, cfg.batch_size):  # a trailing batch of one would break batch norm
            idx = perm[s : s + cfg.batch_size]
            if idx.numel() < 2:
                continue
            loss = F.cross_entropy(model(feats[idx].float()), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * idx.numel()
        epoch_loss = total / n
        history.append(epoch_loss)
        if epoch_loss < best * (1 - cfg.min_delta):
            best, stale = epoch_loss, 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    model.eval()
    return {"epochs": len(history), "loss": history}


def train_ensemble(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: EnsembleConfig,
                   seed: int = 0) -> tuple[MLPEnsemble, list[dict]]:
    """Train ``cfg.members`` MLPs on ``feats`` (N, F) and class indices ``labels`` (N,)."""
    if feats.shape[0] != labels.shape[0]:
        raise ValueError(f"{feats.shape[0]} feature rows but {labels.shape[0]} labels")
    if feats.shape[0] < 2:
        raise ValueError("need at least two labelled pixels to train the pixel classifiers")
    torch.manual_seed(seed)
    ens = MLPEnsemble(feats.shape[1], num_classes, cfg.members, cfg.hidden)
    hist = [train_member(m, feats, labels.long(), cfg, seed * 1000 + i) for i, m in enumerate(ens.members)]
    return ens, hist


class FeatureSegmenter(nn.Module):
    """Frozen U-Net features + MLP ensemble, with the segmenter interface of :class:`EDMPrecond`:
    :meth:`segment` gives mask "logits" (binary: vote share - 1/2; multi-class: vote shares) that
    :mod:`medhybrid.workflows.evaluate` thresholds as it does the network's."""

    def __init__(self, extractor: PixelFeatures, ensemble: MLPEnsemble, mask_channels: int):
        super().__init__()
        self.extractor, self.ensemble, self.mask_channels = extractor, ensemble, mask_channels

    @torch.no_grad()
    def vote_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Vote counts (B, K, H, W)."""
        out = []
        for s in range(0, x.shape[0], self.extractor.cfg.chunk):
            f = self.extractor(x[s : s + self.extractor.cfg.chunk])
            b, c, h, w = f.shape
            v = self.ensemble.votes(f.permute(0, 2, 3, 1).reshape(-1, c).cpu())
            out.append(v.reshape(b, h, w, -1).permute(0, 3, 1, 2))
        return torch.cat(out)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        v = self.vote_maps(x)
        share = v / v.sum(1, keepdim=True)
        return share[:, 1:2] - 0.5 if self.mask_channels == 1 else share

    def uncertainty(self, x: torch.Tensor) -> torch.Tensor:
        """Ensemble disagreement (B, 1, H, W): normalised vote entropy."""
        return vote_entropy(self.vote_maps(x).permute(0, 2, 3, 1)).unsqueeze(1)


def training_pixels(extractor: PixelFeatures, images: torch.Tensor, labels: torch.Tensor, max_pixels: int,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, F) float16 and class indices (N,) of the labelled pixels, at most ``max_pixels``
    (an even random share per image; ignored pixels dropped). Computed ``extractor.cfg.chunk`` images at a time."""
    g = torch.Generator().manual_seed(seed)
    per_image = max(1, max_pixels // max(1, images.shape[0]))
    xs, ys = [], []
    for s in range(0, images.shape[0], extractor.cfg.chunk):
        f = extractor(images[s : s + extractor.cfg.chunk]).cpu()
        for fi, li in zip(f, labels[s : s + extractor.cfg.chunk], strict=True):
            lab = torch.as_tensor(li).reshape(-1).long()
            idx = torch.nonzero(lab != IGNORE_INDEX).flatten()
            if idx.numel() > per_image:
                idx = idx[torch.randperm(idx.numel(), generator=g)[:per_image]]
            xs.append(fi.reshape(fi.shape[0], -1)[:, idx].T.half())
            ys.append(lab[idx])
    return torch.cat(xs), torch.cat(ys)


# ------------------------------------------------------------------------------------------------ runner
class PixelFeaturesConfig(FewShotRunConfig):
    """One few-shot run of the method: features of a frozen pretrained network + MLP ensemble."""

    init: Path = Field(description="pretrained model.pt (diffusion, hybrid or MDM) whose decoder gives the features")
    method: str = "ddpm-features"
    features: FeatureConfig = Field(default_factory=FeatureConfig)
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig)

    runs_subdir: ClassVar[str] = "pixel_features"
    what: ClassVar[str] = "the few-shot pixel classifiers' training"


@dataclass
class PixelFeaturesResult:
    folder: Path
    checkpoint: Path
    run_id: str | None
    ids: list[str]
    stats: dict


def save_feature_segmenter(seg: FeatureSegmenter, meta: dict, path: Path) -> Path:
    """``{"ensemble", "meta"}`` (the backbone stays in ``meta["init"]``), loadable with ``weights_only=True``."""
    return atomic_save({"ensemble": {k: v.detach().cpu() for k, v in seg.ensemble.state_dict().items()}, "meta": meta}, path)


def load_feature_segmenter(path: str | Path, map_location="cpu") -> tuple[FeatureSegmenter, dict]:
    """Rebuild a :class:`FeatureSegmenter` saved by :func:`save_feature_segmenter` (needs its pretrained ``init``)."""
    ckpt = read_model_file(path, map_location)
    meta = ckpt["meta"]
    net, _ = load_model(meta["init"], map_location)
    ext = PixelFeatures(net, FeatureConfig(**meta["features"]))
    ens_cfg = EnsembleConfig(**meta["ensemble"])
    ens = MLPEnsemble(meta["n_features"], meta["num_classes"], ens_cfg.members, ens_cfg.hidden)
    ens.load_state_dict(ckpt["ensemble"])
    return FeatureSegmenter(ext, ens, net.mask_channels), meta


def run_pixel_features(cfg: PixelFeaturesConfig) -> PixelFeaturesResult:
    """Train (or return the finished run of) ``cfg``: writes ``model.pt`` (ensemble + metadata),
    ``config.yaml``, ``subset.json`` and one MLflow run (tagged like a fine-tune)."""

    folder, model_path = cfg.folder, cfg.folder / "model.pt"
    with claim_few_shot_run(cfg) as run:
        if run.finished:
            done = run.state
            return PixelFeaturesResult(folder, model_path, done.get("mlflow_run_id"), done.get("ids", []), done.get("stats", {}))

        net, meta = load_model(cfg.init)
        require_channels(meta, cfg)
        preprocess = Preprocess(**meta["preprocess"])
        pairs = few_shot_pairs(cfg.dataset, cfg.budget, cfg.seed, ids=cfg.ids)
        ids = [p["id"] for p in pairs]
        run_id = open_few_shot_run(cfg, run, ids)
        t0 = time.perf_counter()
        data = list(Dataset(pairs, transform=preprocessing(cfg.dataset, preprocess)))
        images = torch.stack([torch.as_tensor(d["image"]) for d in data])
        labels = torch.stack([torch.as_tensor(d["label"]) for d in data])
        ext = PixelFeatures(net, cfg.features)
        feats, y = training_pixels(ext, images, labels, cfg.ensemble.max_pixels, cfg.seed)
        t_feat = time.perf_counter() - t0
        nc = max(2, cfg.dataset.mask.num_classes)
        ens, hist = train_ensemble(feats, y, nc, cfg.ensemble, cfg.seed)
        stats = {"pixels": int(feats.shape[0]), "n_features": int(feats.shape[1]),
                 "feature_mib": feats.numel() * feats.element_size() / 2**20, "feature_s": t_feat,
                 "train_s": time.perf_counter() - t0 - t_feat, "mean_epochs": sum(x["epochs"] for x in hist) / len(hist),
                 "final_loss": sum(x["loss"][-1] for x in hist) / len(hist)}
        log.info("%s: %d pixels x %d features (%.1f MiB float16), features %.1f s, %d MLPs %.1f s (%.1f epochs, loss %.4f)",
                 cfg.method, stats["pixels"], stats["n_features"], stats["feature_mib"], t_feat, len(hist),
                 stats["train_s"], stats["mean_epochs"], stats["final_loss"])
        out_meta = {"init": str(Path(cfg.init).resolve()), "features": dump_config(cfg.features),
                    "ensemble": dump_config(cfg.ensemble), "n_features": int(feats.shape[1]), "num_classes": nc,
                    "preprocess": dump_config(preprocess), "model": dump_config(ModelConfig(**meta["model"])),
                    "dataset": cfg.dataset.name, "method": cfg.method, "budget": len(pairs), "seed": cfg.seed}
        save_feature_segmenter(FeatureSegmenter(ext, ens, net.mask_channels), out_meta, model_path)
        if run_id:
            tracking.log_metrics(cfg.mlflow, run_id, {f"pixel_{k}": float(v) for k, v in stats.items()}, step=0)
        run.finish([folder / "config.yaml", folder / "subset.json"], stats=stats)
        return PixelFeaturesResult(folder, model_path, run_id, ids, stats)


__all__ = ["EnsembleConfig", "FeatureConfig", "FeatureSegmenter", "MLPEnsemble", "PixelFeatures", "PixelFeaturesConfig",
           "load_feature_segmenter", "majority_vote", "pixel_mlp", "run_pixel_features", "save_feature_segmenter",
           "train_ensemble", "training_pixels", "vote_entropy"]
