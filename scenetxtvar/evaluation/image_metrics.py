"""FID / KID and CLIPScore through torchmetrics, from local weight files only.

torchmetrics downloads the Inception (torch-fidelity) and CLIP (Hugging Face) weights on first use;
nothing may download here, so each metric runs only when its local weights are configured:

- ``fid_weights``: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (the standard FID
  Inception, also pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``); needs ``torch-fidelity``.
  One extractor feeds both FID and KID (KID's subset size shrinks to the number of images).
- ``clip_model``: a local Hugging Face CLIP directory (e.g. a copy of ``openai/clip-vit-base-patch32``,
  the papers' ViT-B/32); torchmetrics' CLIPScore, i.e. ``100 * max(cos, 0)`` (GlyphControl's scale).

Otherwise the metric is skipped with a one-line notice saying why (``notices``), never a crash.
With a handful of images FID/KID are noisy: the report gives the number of images next to them.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

FID_FILE_HINT = "weights-inception-2015-12-05-6726825d.pth"


def _to_uint8(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] (float) or uint8 -> uint8 on the CPU."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.cpu()
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


class ImageMetrics:
    """FID/KID between real and generated images and CLIPScore of generated images vs prompts, when configured.

    ``feature_extractor`` replaces the Inception network (non-standard numbers, for tests or custom
    features); ``notices`` maps a metric group ("fid", "clip") to why it was skipped.
    """

    def __init__(
        self,
        fid_weights: str | os.PathLike | None = None,
        clip_model: str | os.PathLike | None = None,
        kid_subset_size: int = 50,
        kid_subsets: int = 100,
        clip_prefix: str = "",
        feature_extractor: nn.Module | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.notices: dict[str, str] = {}
        self.num_images = 0
        self.kid_subset_size = int(kid_subset_size)
        self.clip_prefix = clip_prefix
        self.fid = self.kid = self.clip = None
        self.custom_features = feature_extractor is not None
        extractor = feature_extractor if feature_extractor is not None else self._inception(fid_weights)
        if extractor is not None:
            from torchmetrics.image.fid import FrechetInceptionDistance
            from torchmetrics.image.kid import KernelInceptionDistance

            self.fid = FrechetInceptionDistance(feature=extractor).to(self.device)
            self.kid = KernelInceptionDistance(feature=extractor, subsets=kid_subsets, subset_size=1).to(self.device)
        self.clip = self._clip(clip_model)
        for notice in self.notices.values():
            logger.warning(notice)

    # ------------------------------------------------------------------ construction

    def _inception(self, path: str | os.PathLike | None) -> nn.Module | None:
        """torch-fidelity's FID Inception from a local file, or None with a notice."""
        if not path:
            self.notices["fid"] = (
                "FID/KID skipped: no local Inception weights configured "
                f"(set metrics.fid_weights=/path/{FID_FILE_HINT}; torchmetrics would download them)"
            )
            return None
        path = Path(os.path.expanduser(str(path)))
        if not path.is_file():
            self.notices["fid"] = (
                f"FID/KID skipped: the Inception weights file {path} does not exist (metrics.fid_weights)"
            )
            return None
        if importlib.util.find_spec("torch_fidelity") is None:
            self.notices["fid"] = "FID/KID skipped: torch-fidelity is not installed (pip install torch-fidelity)"
            return None
        from torchmetrics.image.fid import NoTrainInceptionV3

        return NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path)
        )

    def _clip(self, path: str | os.PathLike | None):
        """torchmetrics' CLIPScore over a local Hugging Face CLIP directory, or None with a notice."""
        if not path:
            self.notices["clip"] = (
                "CLIPScore skipped: no local CLIP model configured "
                "(set metrics.clip_model=/path/to/clip-vit-base-patch32; torchmetrics would download it)"
            )
            return None
        path = Path(os.path.expanduser(str(path)))
        if not (path / "config.json").is_file():
            self.notices["clip"] = (
                f"CLIPScore skipped: {path} is not a local Hugging Face CLIP directory (metrics.clip_model)"
            )
            return None
        from torchmetrics.multimodal.clip_score import CLIPScore

        def load() -> tuple[Any, Any]:
            from transformers import CLIPModel, CLIPProcessor

            return (
                CLIPModel.from_pretrained(str(path), local_files_only=True),
                CLIPProcessor.from_pretrained(str(path), local_files_only=True),
            )

        return CLIPScore(model_name_or_path=load).to(self.device)

    # ------------------------------------------------------------------ accumulation

    @property
    def active(self) -> bool:
        """Whether any metric will be computed."""
        return self.fid is not None or self.clip is not None

    @torch.no_grad()
    def update(self, real: Tensor | None, fake: Tensor, prompts: Sequence[str] | None = None) -> None:
        """Add a batch: real and generated (B, 3, H, W) images in [-1, 1] (or uint8), and the prompts."""
        fake_u8 = _to_uint8(fake)
        self.num_images += fake_u8.shape[0]
        if self.fid is not None and real is not None:
            real_u8 = _to_uint8(real)
            for metric in (self.fid, self.kid):
                metric.update(real_u8.to(self.device), real=True)
                metric.update(fake_u8.to(self.device), real=False)
        if self.clip is not None:
            if prompts is None or len(prompts) != fake_u8.shape[0]:
                raise ValueError(f"CLIPScore needs one prompt per image, got {prompts!r} for {fake_u8.shape[0]} images")
            self.clip.update(list(fake_u8.to(self.device)), [self.clip_prefix + p for p in prompts])

    def compute(self) -> dict[str, float | None]:
        """``fid``, ``kid_mean``, ``kid_std``, ``clip_score`` (None when skipped)."""
        out: dict[str, float | None] = {"fid": None, "kid_mean": None, "kid_std": None, "clip_score": None}
        if self.fid is not None:
            n = int(self.fid.fake_features_num_samples)
            if n < 2:
                self.notices["fid"] = f"FID/KID skipped: they need at least 2 images, got {n}"
                logger.warning(self.notices["fid"])
            else:
                out["fid"] = float(self.fid.compute())
                self.kid.subset_size = min(self.kid_subset_size, n)
                kid_mean, kid_std = self.kid.compute()
                out["kid_mean"], out["kid_std"] = float(kid_mean), float(kid_std)
        if self.clip is not None and self.num_images:
            out["clip_score"] = float(self.clip.compute())
        return out
