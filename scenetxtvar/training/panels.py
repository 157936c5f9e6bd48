"""Sample panels during training: control | ground truth | sample with control | sample without control.

The same fixed prompts/controls (the first training batch) and the same seed at every panel, so the
columns show what the branch learned, not sampling noise. Without the control the sampler is the base
model's, so that column stays put while the "with control" column should come to follow the control.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from ..models.pilot import build_control_pyramid
from .drift import eval_mode, trainer_forward_context

logger = logging.getLogger(__name__)

COLUMN_TITLES = ("control", "ground truth", "with control", "without control")
_PAD, _TITLE_H, _CAPTION_H = 4, 18, 16


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def to_uint8(image: Tensor) -> np.ndarray:
    """A (C, H, W) tensor in [-1, 1] as an (H, W, 3) uint8 array (first 3 channels; 1-2 channels repeated)."""
    x = image.detach().float().cpu()
    if x.dim() != 3:
        raise ValueError(f"expected a (C, H, W) image, got shape {tuple(x.shape)}")
    if x.shape[0] < 3:
        x = x[:1].expand(3, -1, -1)
    x = ((x[:3].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 0).contiguous().numpy()


def _fit(text: str, draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, width: int) -> str:
    """``text`` cut (with an ellipsis) to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def make_panel(
    control: Tensor,
    ground_truth: Tensor,
    with_control: Tensor,
    without_control: Tensor,
    captions: Sequence[str],
    titles: Sequence[str] = COLUMN_TITLES,
) -> Image.Image:
    """One row per sample of the four (N, C, H, W) [-1, 1] batches, column titles on top, caption under each row.

    Every tile is resized to the ground truth's size.
    """
    return column_panel([control, ground_truth, with_control, without_control], captions, titles, size_of=1)


def column_panel(
    columns: Sequence[Tensor], captions: Sequence[str], titles: Sequence[str], size_of: int = 0
) -> Image.Image:
    """Any number of (N, C, H, W) [-1, 1] batches side by side: one row per sample, titles, captions.

    Every tile is resized to the size of ``columns[size_of]``.
    """
    n = columns[size_of].shape[0]
    if any(c.shape[0] != n for c in columns) or len(captions) != n or len(titles) != len(columns):
        raise ValueError(
            f"a panel needs the same number of rows everywhere and one title per column, got "
            f"{[c.shape[0] for c in columns]} images, {len(captions)} captions and {len(titles)} titles"
        )
    h, w = columns[size_of].shape[-2:]
    width = len(columns) * w + (len(columns) + 1) * _PAD
    row_h = h + _CAPTION_H + _PAD
    panel = Image.new("RGB", (width, _TITLE_H + n * row_h + _PAD), "white")
    draw = ImageDraw.Draw(panel)
    font = _font()
    for c, title in enumerate(titles):
        x = _PAD + c * (w + _PAD)
        draw.text((x + 2, 3), _fit(title, draw, font, w - 4), fill="black", font=font)
    for r in range(n):
        y = _TITLE_H + r * row_h
        for c, col in enumerate(columns):
            tile = Image.fromarray(to_uint8(col[r]))
            if tile.size != (w, h):
                tile = tile.resize((w, h), Image.BILINEAR)
            panel.paste(tile, (_PAD + c * (w + _PAD), y))
        draw.text(
            (_PAD + 2, y + h + 2), _fit(str(captions[r]), draw, font, width - 2 * _PAD - 4), fill="black", font=font
        )
    return panel


def take_samples(batch: Mapping[str, Any], num: int) -> dict[str, Any]:
    """A CPU copy of the first ``num`` (valid, when flagged) samples of a training batch."""
    b = batch["images"].shape[0]
    valid = batch.get("valid")
    order = list(range(b))
    if valid is not None:
        flags = [bool(v) for v in valid.tolist()]
        order = [i for i in order if flags[i]] + [i for i in order if not flags[i]]
    idx = torch.tensor(order[:num])
    return {
        "images": batch["images"].detach().index_select(0, idx.to(batch["images"].device)).cpu().clone(),
        "controls": batch["controls"].detach().index_select(0, idx.to(batch["controls"].device)).cpu().clone(),
        "captions": [batch["captions"][i] for i in idx.tolist()],
        "schedule": [tuple(int(v) for v in e) for e in batch["schedule"]] if batch.get("schedule") else None,
    }


@rank_zero_only
def _publish(loggers: Sequence[Any], panel: Image.Image, path: Path, step: int) -> None:
    """Save the panel and send it to every WandbLogger (rank zero only)."""
    from lightning.pytorch.loggers import WandbLogger

    path.parent.mkdir(parents=True, exist_ok=True)
    panel.save(path)
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            lg.log_image(
                key="samples", images=[panel], step=step, caption=[f"step {step}: " + " | ".join(COLUMN_TITLES)]
            )
    logger.info("sample panel written to %s", path)


class SamplePanelCallback(L.Callback):
    """Every ``every_n_steps`` optimizer steps (and at the end), sample the first batch's prompts with and
    without their control and save/log the panel.

    Generation runs on every rank (under FSDP2 a forward needs all of them); rank zero writes the PNG to
    ``save_dir/step_XXXXXX.png`` (default ``<default_root_dir>/panels``) and logs it as ``samples`` to wandb.
    """

    def __init__(
        self,
        every_n_steps: int = 200,
        num_samples: int = 2,
        cfg: float = 3.0,
        control_cfg: float = 1.0,
        tau: float = 1.0,
        top_k: int = 0,
        top_p: float = 0.97,
        seed: int = 0,
        save_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        if every_n_steps < 1 or num_samples < 1:
            raise ValueError(f"every_n_steps and num_samples must be >= 1, got {every_n_steps}, {num_samples}")
        self.every_n_steps, self.num_samples = every_n_steps, num_samples
        self.cfg, self.control_cfg, self.tau, self.top_k, self.top_p, self.seed = (
            cfg,
            control_cfg,
            tau,
            top_k,
            top_p,
            seed,
        )
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.samples: dict[str, Any] | None = None
        self.last_step = -1

    def panel_path(self, trainer: Any, step: int) -> Path:
        """Where the panel of ``step`` goes."""
        base = self.save_dir if self.save_dir is not None else Path(trainer.default_root_dir) / "panels"
        return base / f"step_{step:06d}.png"

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Keep the first batch's samples (CPU) as the fixed panel inputs."""
        if self.samples is None:
            self.samples = take_samples(batch, self.num_samples)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """A panel every ``every_n_steps`` optimizer steps (once per step under gradient accumulation)."""
        step = int(trainer.global_step)
        if step > 0 and step % self.every_n_steps == 0 and step != self.last_step:
            self.render(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """A last panel at the final step, unless one was just made."""
        if int(trainer.global_step) != self.last_step:
            self.render(trainer, pl_module)

    @torch.no_grad()
    def generate(self, pl_module: Any, trainer: Any = None) -> tuple[Tensor, Tensor]:
        """Images (N, 3, H, W) in [-1, 1] of the fixed samples with and without control (same seed)."""
        if self.samples is None:
            raise RuntimeError("no samples kept yet: the callback keeps the first training batch")
        s = self.samples
        model, device = pl_module.model, pl_module.device
        n = s["images"].shape[0]
        sched = pl_module.schedule_for(s)
        text = pl_module.text_encoder.encode(list(s["captions"])).to(device)
        pyramid = build_control_pyramid(s["controls"].to(device), sched, patch=model.control_patch)
        kw = dict(
            vae=pl_module.vae,
            scale_schedule=sched,
            label_B_or_BLT=text,
            B=n,
            g_seed=self.seed,
            cfg_list=self.cfg,
            tau_list=self.tau,
            top_k=self.top_k,
            top_p=self.top_p,
        )
        with eval_mode(pl_module), trainer_forward_context(trainer):
            with_control = model.autoregressive_infer_cfg(**kw, control_tensors=pyramid, control_cfg=self.control_cfg)
            without_control = model.autoregressive_infer_cfg(**kw)
        return with_control.image.float().clamp(-1, 1), without_control.image.float().clamp(-1, 1)

    def render(self, trainer: Any, pl_module: Any) -> Path | None:
        """Generate, build, save and log the panel of the current step; returns its path (None: nothing kept)."""
        if self.samples is None:
            return None
        step = int(trainer.global_step)
        self.last_step = step
        with_control, without_control = self.generate(pl_module, trainer)
        s = self.samples
        panel = make_panel(s["controls"], s["images"], with_control.cpu(), without_control.cpu(), s["captions"])
        path = self.panel_path(trainer, step)
        _publish(trainer.loggers, panel, path, step)
        return path
