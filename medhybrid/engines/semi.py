"""Semi-supervised fine-tuning: the few labelled target images and the rest of the target's pool, without masks, in
every batch.

Each algorithm is a prepare-batch seam (what the network sees, and what the unlabelled rows are compared with) and an
unsupervised term of :class:`SemiSupervisedLoss`; MONAI's ``SupervisedTrainer`` runs them as it runs fine-tuning
(:func:`medhybrid.engines.fit.fit`). A batch holds ``k_l`` labelled rows then ``k_u`` unlabelled ones
(:class:`medhybrid.engines.batches.MixedBatchSampler`); an unlabelled row carries ``labelled = 0`` and a label of ignored
pixels (:class:`medhybrid.data.unlabelled.MixedDataset`), so the mask loss never sees one of its pixels.

- ``mean-teacher`` (Tarvainen & Valpola, NeurIPS 2017): the teacher's weights are an exponential moving average of
  the student's, theta'_t = alpha theta'_{t-1} + (1 - alpha) theta_t (eq. 1, Ignite's ``EMAHandler``); the
  consistency cost J = E ||f(x, theta', eta') - f(x, theta, eta)||^2 compares the class probabilities of student and
  teacher under independent input noise eta, eta', on every row of the batch (section 2); its weight ramps up with
  Laine & Aila's sigmoid w(t) = exp(-5 (1 - t/T)^2).
- ``fixmatch`` (Sohn et al., NeurIPS 2020): the model's prediction on a weakly augmented unlabelled image, where its
  confidence max q reaches the threshold tau, is the hard pseudo-label for the same image strongly augmented:
  l_u = 1/(mu B) sum_b 1(max q_b >= tau) H(argmax q_b, p(y | A(u_b))) (eq. 4), per pixel here, with the
  photometric part of the strong augmentation and Cutout on top of the weak view so that the pixels stay aligned
  (as segmentation variants of FixMatch do); lambda_u = 1, tau = 0.95.
- ``denoise`` (hybrid fine-tuning): the hybrid's own objective on the unlabelled rows, EDM's weighted denoising loss
  at log-normal noise levels (Karras et al. 2022, eq. 2 and Table 1), beside the mask loss on the labelled rows at
  sigma_min. Needs the network's image channels (a medhybrid model, not a bundle's mask-only ``Segmenter``).

Each algorithm is one :class:`SemiAlgorithm` subclass, decorated with :func:`register`: its defaults, the views an
unlabelled item carries, its prepare-batch seam and its unsupervised term. A new algorithm is one new class here;
configs name it by ``name``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.handlers import EMAHandler
from monai.engines import PrepareBatch
from monai.transforms import (
    Compose,
    CopyItemsd,
    RandAdjustContrastd,
    RandCoarseDropoutd,
    RandGaussianNoised,
    RandShiftIntensityd,
)
from monai.utils import CommonKeys as Keys
from pydantic import Field, field_validator
from torch import nn

from medhybrid.core.config import StrictModel
from medhybrid.core.registry import Registry
from medhybrid.engines.batches import as_plain_tensor, step_generator
from medhybrid.engines.losses import SegmentationLoss
from medhybrid.networks import diffusion as D
from medhybrid.networks.diffusion import denoising_loss

__all__ = [
    "STRONG_KEY",
    "SemiAlgorithm",
    "MeanTeacher",
    "FixMatch",
    "Denoise",
    "algorithm_names",
    "get_algorithm",
    "register",
    "DenoisePrepareBatch",
    "FixMatchPrepareBatch",
    "MeanTeacherPrepareBatch",
    "SemiConfig",
    "SemiSupervisedLoss",
    "StrongAugmentConfig",
    "confident_pseudo_label_loss",
    "consistency_loss",
    "prepare_and_loss",
    "probabilities",
    "sigmoid_rampup",
    "strong_augmentation",
]

STRONG_KEY = "image_strong"
"""The dictionary key of an unlabelled image's strongly augmented view (FixMatch)."""


# --------------------------------------------------------------------------------------------- the papers' math
def sigmoid_rampup(step: int | float, length: int | float) -> float:
    """Laine & Aila (ICLR 2017), used by mean teacher: exp(-5 (1 - t/T)^2) for t < T, then 1 (T = 0: always 1)."""
    if length <= 0 or step >= length:
        return 1.0
    t = max(0.0, float(step)) / float(length)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities of mask logits (B, C, H, W): sigmoid for one channel (the foreground's), softmax otherwise."""
    return torch.sigmoid(logits.float()) if logits.shape[1] == 1 else torch.softmax(logits.float(), dim=1)


def consistency_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Mean teacher's consistency cost, per sample (B,): the squared difference of student and teacher probabilities
    (Tarvainen & Valpola 2017, MSE variant), averaged over channels and pixels."""
    return (probabilities(student_logits) - teacher_probs.float()).square().flatten(1).mean(1)


def confident_pseudo_label_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """FixMatch's unlabelled loss (Sohn et al. 2020, eq. 4) per sample (B,), per pixel: cross-entropy of the student's
    logits against the hard pseudo-label argmax q where max q >= ``threshold``, averaged over *all* pixels (a pixel
    below the threshold contributes 0, it is not dropped from the mean)."""
    q = teacher_probs.float()
    if student_logits.shape[1] == 1:
        confidence = torch.maximum(q, 1 - q)[:, 0]
        hard = (q > 0.5).float()
        ce = F.binary_cross_entropy_with_logits(student_logits.float(), hard, reduction="none")[:, 0]
    else:
        confidence, hard = q.max(1)
        ce = F.cross_entropy(student_logits.float(), hard, reduction="none")
    return (ce * (confidence >= threshold).float()).flatten(1).mean(1)


# --------------------------------------------------------------------------------------------- configuration
class StrongAugmentConfig(StrictModel):
    """FixMatch's strong augmentation on top of the weak (geometric) one: MONAI's photometric transforms and Cutout,
    applied to a copy of the weakly augmented image (``image_strong``) so pseudo-labels stay pixel-aligned."""

    contrast: tuple[float, float] = Field((0.5, 2.0), description="gamma range of RandAdjustContrast")
    shift: float = Field(0.3, ge=0, description="intensity shift range +-shift (images in [-1, 1])")
    noise: float = Field(0.1, ge=0, description="Gaussian noise std")
    cutout: float = Field(0.5, ge=0, le=1, description="Cutout box side, as a fraction of the image side (FixMatch: "
                          "up to half the image)")
    prob: float = Field(0.8, ge=0, le=1, description="probability of each photometric transform (Cutout: always)")


class SemiConfig(StrictModel):
    """Semi-supervised fine-tuning. ``algorithm: none`` is plain fine-tuning on the labelled subset."""

    algorithm: str = Field("none", description="none, or a registered algorithm: mean-teacher, fixmatch, denoise")
    unlabelled_batch: int = Field(8, ge=1, description="unlabelled images in each batch, beside the labelled ones (8 "
                                  "beside fine-tuning's 8 labelled: an iteration costs about twice plain fine-tuning's)")
    weight: float | None = Field(None, ge=0, description="weight of the unsupervised term; None: the algorithm's "
                                 "default (mean-teacher 1.0 at the end of the ramp-up, fixmatch lambda_u = 1, denoise 1.0)")
    rampup: float | None = Field(None, ge=0, le=1, description="share of the iterations over which the weight ramps "
                                 "up (sigmoid); None: the algorithm's default (mean-teacher 0.4, fixmatch and denoise 0)")
    ema_decay: float = Field(0.99, gt=0, lt=1, description="mean-teacher: alpha of the teacher's moving average")
    input_noise: float = Field(0.1, ge=0, description="mean-teacher: std of the Gaussian input noise eta (images in "
                               "[-1, 1]), drawn independently for student and teacher")
    threshold: float = Field(0.95, ge=0, le=1, description="fixmatch: confidence tau for a pixel's pseudo-label")
    strong: StrongAugmentConfig = Field(default_factory=StrongAugmentConfig)
    max_unlabelled: int | None = Field(None, ge=1, description="use at most N unlabelled pool images (None: all)")

    @field_validator("algorithm")
    @classmethod
    def _known(cls, v: str) -> str:
        if v != "none":
            get_algorithm(v)
        return v

    @property
    def enabled(self) -> bool:
        return self.algorithm != "none"

    @property
    def method(self) -> SemiAlgorithm | None:
        """The registered algorithm (None for ``none``)."""
        return get_algorithm(self.algorithm) if self.enabled else None

    @property
    def unsupervised_weight(self) -> float:
        if self.weight is not None:
            return self.weight
        return self.method.default_weight if self.enabled else 0.0

    @property
    def rampup_share(self) -> float:
        if self.rampup is not None:
            return self.rampup
        return self.method.default_rampup if self.enabled else 0.0

    def per_batch(self, labelled: int) -> tuple[int, int]:
        """(labelled, unlabelled) rows of a batch with ``labelled`` labelled rows."""
        return labelled, self.unlabelled_batch

    @property
    def views(self) -> tuple[str, ...]:
        """The further image keys an unlabelled item carries (FixMatch's strong view)."""
        return self.method.views if self.enabled else ()

    def strong_transforms(self, resolution: int) -> list:
        """The transforms that add an unlabelled item's strong view (FixMatch), after its weak augmentation; none
        for the other algorithms."""
        return list(strong_augmentation(self.strong, resolution).transforms) if self.views else []


def strong_augmentation(cfg: StrongAugmentConfig, resolution: int) -> Compose:
    """The dictionary transforms that add ``image_strong`` (a strongly augmented copy of ``image``, a square of side
    ``resolution``) to an item."""
    side = max(1, int(round(cfg.cutout * resolution)))
    return Compose([
        CopyItemsd("image", times=1, names=STRONG_KEY),
        RandAdjustContrastd(STRONG_KEY, prob=cfg.prob, gamma=cfg.contrast),
        RandShiftIntensityd(STRONG_KEY, offsets=cfg.shift, prob=cfg.prob),
        RandGaussianNoised(STRONG_KEY, prob=cfg.prob, std=cfg.noise),
        RandCoarseDropoutd(STRONG_KEY, holes=1, spatial_size=1, max_spatial_size=side, fill_value=0.0, prob=1.0),
    ])


# --------------------------------------------------------------------------------------------- prepare-batch seams
class _MixedPrepareBatch(PrepareBatch):
    """What every semi-supervised batch unpacks: image (B, C, H, W), label (unlabelled rows all ignored), ``labelled``
    (B,), and the engine's iteration (randomness is a function of (seed, iteration), so a resumed run draws the same)."""

    def __init__(self, total_iterations: int, weight: float, rampup: float = 0.0, seed: int = 0):
        self.total_iterations, self.weight, self.rampup, self.seed = total_iterations, weight, rampup, seed
        self.step = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, lambda e: setattr(self, "step", e.state.iteration))

    def checkpointed(self) -> dict:
        """Objects whose state a checkpoint must hold for an exact resume (:func:`medhybrid.engines.fit.fit`)."""
        return {}

    def unsupervised_weight(self) -> float:
        """The weight of the unsupervised term at this iteration (sigmoid ramp-up over ``rampup`` of the run)."""
        return self.weight * sigmoid_rampup(self.step - 1, self.rampup * self.total_iterations)

    def unpack(self, batchdata, device, non_blocking):
        x = as_plain_tensor(batchdata[Keys.IMAGE]).to(device=device, non_blocking=non_blocking).float()
        y = as_plain_tensor(batchdata[Keys.LABEL]).to(device=device, non_blocking=non_blocking)
        labelled = as_plain_tensor(batchdata["labelled"]).float().flatten().to(x.device)
        return x, y, labelled


class MeanTeacherPrepareBatch(_MixedPrepareBatch):
    """Mean teacher's batch: the student sees every image under noise eta, the teacher (the EMA of the student's
    weights, Ignite's ``EMAHandler``, made from the trainer's network when attached) under independent noise eta';
    the teacher's probabilities go to the loss as ``teacher_probs``."""

    def __init__(self, total_iterations: int, weight: float, rampup: float, ema_decay: float, input_noise: float,
                 image_channels: int, seed: int = 0):
        super().__init__(total_iterations, weight, rampup, seed)
        self.ema_decay, self.input_noise, self.image_channels = ema_decay, input_noise, image_channels
        self.ema: EMAHandler | None = None

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        self.ema = EMAHandler(engine.network, momentum=1.0 - self.ema_decay)
        self.ema.attach(engine, name="teacher_momentum", event=Events.ITERATION_COMPLETED)

    def checkpointed(self) -> dict:
        return {"teacher": self.ema.ema_model} if self.ema is not None else {}

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        x, y, labelled = self.unpack(batchdata, device, non_blocking)
        g = step_generator(self.seed, self.step)
        eta, eta_t = (self.input_noise * torch.randn(x.shape, generator=g) for _ in range(2))
        with torch.no_grad():
            teacher_logits = self.ema.ema_model(x + eta_t.to(x.device))[:, self.image_channels :]
        targets = {"label": y, "labelled": labelled, "teacher_probs": probabilities(teacher_logits),
                   "weight": self.unsupervised_weight()}
        return x + eta.to(x.device), targets, (), {}


class FixMatchPrepareBatch(_MixedPrepareBatch):
    """FixMatch's batch: the labelled rows as they are; the unlabelled rows' pseudo-label probabilities from the
    trainer's own network (no gradient) on the weak view, and the strong view (``image_strong``) as their input."""

    def __init__(self, total_iterations: int, weight: float, rampup: float, image_channels: int, seed: int = 0):
        super().__init__(total_iterations, weight, rampup, seed)
        self.image_channels = image_channels
        self.network: nn.Module | None = None

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        self.network = engine.network

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        x, y, labelled = self.unpack(batchdata, device, non_blocking)
        strong = as_plain_tensor(batchdata[STRONG_KEY]).to(device=x.device, non_blocking=non_blocking).float()
        unl = labelled <= 0
        with torch.no_grad():
            q = torch.zeros((x.shape[0], 0, *x.shape[2:]), device=x.device)
            if unl.any():
                logits = self.network(x[unl])[:, self.image_channels :]
                q = torch.zeros((x.shape[0], logits.shape[1], *x.shape[2:]), device=x.device)
                q[unl] = probabilities(logits)
        inputs = torch.where(unl.view(-1, 1, 1, 1), strong, x)
        targets = {"label": y, "labelled": labelled, "teacher_probs": q, "weight": self.unsupervised_weight()}
        return inputs, targets, (), {}


class DenoisePrepareBatch(_MixedPrepareBatch):
    """Hybrid fine-tuning's batch: labelled rows clean at sigma_min, unlabelled rows noised at EDM's log-normal
    sigma (x = x_0 + sigma n), the network conditioned on each row's sigma."""

    def __init__(self, total_iterations: int, weight: float, rampup: float, edm: D.EDMParams = D.EDMParams(), seed: int = 0):
        super().__init__(total_iterations, weight, rampup, seed)
        self.edm = edm

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        x0, y, labelled = self.unpack(batchdata, device, non_blocking)
        g = step_generator(self.seed, self.step)
        b = x0.shape[0]
        sigma = D.sample_sigma_lognormal(b, self.edm.p_mean, self.edm.p_std, generator=g).to(x0.device)
        sigma = torch.where(labelled > 0, torch.full_like(sigma, self.edm.sigma_min), sigma)
        noise = torch.randn(x0.shape, generator=g).to(x0.device) * (labelled <= 0).float().view(-1, 1, 1, 1)
        x = x0 + sigma.view(-1, 1, 1, 1) * noise
        targets = {"label": y, "labelled": labelled, "image": x0, "sigma": sigma, "weight": self.unsupervised_weight()}
        return x, targets, (), {"sigma": sigma}


# --------------------------------------------------------------------------------------------- the loss
class SemiSupervisedLoss(nn.Module):
    """``mask loss on the labelled rows + weight(t) * unsupervised term``.

    The mask loss (:class:`medhybrid.engines.losses.SegmentationLoss`) is averaged over the labelled rows only; the
    unsupervised term (:meth:`SemiAlgorithm.unsupervised`) over the rows it applies to: every row (mean teacher's
    consistency), the unlabelled rows (FixMatch's pseudo-labels, the denoising loss). ``image_channels`` is 0 for a
    network whose output is mask logits alone (a bundle's ``Segmenter``). The last batch's terms are kept in
    :attr:`terms` for logging.
    """

    def __init__(self, algorithm: str, image_channels: int, mask_channels: int = 1, threshold: float = 0.95,
                 sigma_data: float = 0.5):
        super().__init__()
        self.method = get_algorithm(algorithm)
        if self.method.needs_image_channels and image_channels == 0:
            raise ValueError(f"{algorithm} needs a network that outputs the denoised image (a medhybrid model), not mask "
                             "logits alone")
        self.algorithm, self.image_channels, self.threshold, self.sigma_data = algorithm, image_channels, threshold, sigma_data
        self.seg = SegmentationLoss(mask_channels)
        self.terms: dict[str, float] = {}

    def forward(self, pred: torch.Tensor, target: dict) -> torch.Tensor:
        lab = target["labelled"].float()
        seg = self.seg(pred[:, self.image_channels :], target["label"])
        mask_loss = (seg * lab).sum() / lab.sum().clamp(min=1)
        unsup = self.method.unsupervised(self, pred, target, 1.0 - lab)
        w = float(target["weight"])
        self.terms = {"mask_loss": float(mask_loss.detach()), "unsupervised_loss": float(unsup.detach()), "unsupervised_weight": w}
        return mask_loss + w * unsup


def _mean_over(per_sample: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return (per_sample * rows).sum() / rows.sum().clamp(min=1)


# --------------------------------------------------------------------------------------------- the algorithms
_REGISTRY: Registry[SemiAlgorithm] = Registry("semi-supervised algorithm", also=("none",))
register = _REGISTRY.register
"""Class decorator: make the algorithm available by its ``name``."""
get_algorithm = _REGISTRY.get
"""The registered algorithm called ``name``; ValueError naming the known ones otherwise."""
algorithm_names = _REGISTRY.names


class SemiAlgorithm:
    """One semi-supervised algorithm: its defaults, the views an unlabelled item carries, its prepare-batch seam and
    its unsupervised term. Subclasses set the class attributes and implement :meth:`prepare` and :meth:`unsupervised`."""

    name: ClassVar[str] = ""
    default_weight: ClassVar[float] = 1.0
    """Weight of the unsupervised term (after its ramp-up) when the config leaves ``weight`` unset."""
    default_rampup: ClassVar[float] = 0.0
    """Share of the iterations over which the weight ramps up, when the config leaves ``rampup`` unset."""
    views: ClassVar[tuple[str, ...]] = ()
    """Further image keys an unlabelled item carries (FixMatch's strong view)."""
    needs_image_channels: ClassVar[bool] = False
    """Needs the network's image channels (a medhybrid model, not a bundle's mask-only ``Segmenter``)."""

    def prepare(self, cfg: SemiConfig, total_iterations: int, image_channels: int, seed: int,
                edm: D.EDMParams) -> _MixedPrepareBatch:
        raise NotImplementedError

    def unsupervised(self, loss: SemiSupervisedLoss, pred: torch.Tensor, target: dict, unl: torch.Tensor) -> torch.Tensor:
        """The batch's unsupervised term (a scalar) from the network's output ``pred`` (image then mask channels),
        the seam's ``target`` and ``unl`` (B,), 1 on the unlabelled rows."""
        raise NotImplementedError


@register
class MeanTeacher(SemiAlgorithm):
    """Tarvainen & Valpola 2017: consistency with an EMA teacher on every row, weight ramped up over 40 %."""

    name = "mean-teacher"
    default_rampup = 0.4

    def prepare(self, cfg, total_iterations, image_channels, seed, edm):
        return MeanTeacherPrepareBatch(total_iterations, cfg.unsupervised_weight, cfg.rampup_share, cfg.ema_decay,
                                       cfg.input_noise, image_channels, seed)

    def unsupervised(self, loss, pred, target, unl):
        return consistency_loss(pred[:, loss.image_channels :], target["teacher_probs"]).mean()


@register
class FixMatch(SemiAlgorithm):
    """Sohn et al. 2020: confident pseudo-labels of the weak view train the strong view (eq. 4)."""

    name = "fixmatch"
    views = (STRONG_KEY,)

    def prepare(self, cfg, total_iterations, image_channels, seed, edm):
        return FixMatchPrepareBatch(total_iterations, cfg.unsupervised_weight, cfg.rampup_share, image_channels, seed)

    def unsupervised(self, loss, pred, target, unl):
        u = confident_pseudo_label_loss(pred[:, loss.image_channels :], target["teacher_probs"], loss.threshold)
        return _mean_over(u, unl)


@register
class Denoise(SemiAlgorithm):
    """Hybrid fine-tuning: EDM's weighted denoising loss (Karras et al. 2022, eq. 2) on the unlabelled rows."""

    name = "denoise"
    needs_image_channels = True

    def prepare(self, cfg, total_iterations, image_channels, seed, edm):
        return DenoisePrepareBatch(total_iterations, cfg.unsupervised_weight, cfg.rampup_share, edm, seed)

    def unsupervised(self, loss, pred, target, unl):
        c = loss.image_channels
        return _mean_over(denoising_loss(pred[:, :c], target["image"], target["sigma"], loss.sigma_data), unl)


def prepare_and_loss(cfg: SemiConfig, total_iterations: int, image_channels: int, mask_channels: int = 1, seed: int = 0,
                     edm: D.EDMParams = D.EDMParams()) -> tuple[_MixedPrepareBatch, SemiSupervisedLoss]:
    """The prepare-batch seam and the loss of ``cfg.algorithm`` for a run of ``total_iterations``; ``image_channels``
    is 0 for a network whose output is mask logits alone (a bundle's ``Segmenter``)."""
    prepare = cfg.method.prepare(cfg, total_iterations, image_channels, seed, edm)
    return prepare, SemiSupervisedLoss(cfg.algorithm, image_channels, mask_channels, cfg.threshold, edm.sigma_data)
