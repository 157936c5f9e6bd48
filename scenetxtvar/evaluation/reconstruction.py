"""How legible a tokenizer keeps text: OCR of its reconstructions (the ceiling of anything generated through it).

Every eval image goes through the same path the transformer's outputs take: encode, residual multi-scale
BSQ over the transformer's schedule, decode. The reconstructions and the originals are scored with the
same OCR protocol as generated images (:class:`~scenetxtvar.evaluation.ocr.OCRAccuracy`), plus L1 and
PSNR; a panel shows originals beside reconstructions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..scales import normalize_schedule
from ..training.panels import column_panel
from .fidelity import to_uint8_rgb
from .ocr import OCRAccuracy, TextRecognizer, get_recognizer

logger = logging.getLogger(__name__)


@torch.no_grad()
def reconstruct(vae: torch.nn.Module, images: Tensor, schedule: Sequence[Sequence[int]]) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> their reconstructions through the multi-scale codes of ``schedule``."""
    summed, _ = vae.encode(images, normalize_schedule(schedule))
    return vae.decode(summed)


def evaluate_reconstructions(
    vae: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    schedule: Sequence[Sequence[int]],
    num_images: int | None = None,
    out_dir: str | Path | None = None,
    num_examples: int = 8,
    recognizer: TextRecognizer | None = None,
) -> dict[str, float | int | None]:
    """OCR Sen.ACC / NED of reconstructions (``recon_*``) and originals (``gt_*``), L1 and PSNR.

    ``batches`` are datamodule batches (``images``, ``valid``, ``captions``, ``meta`` with words and
    polygons). With ``out_dir``, writes ``reconstructions.png`` (original | reconstruction).
    """
    recognizer = recognizer or get_recognizer()
    ocr = {p: OCRAccuracy(recognizer) for p in ("recon_", "gt_")}
    device = next(vae.parameters()).device
    done, l1_sum, log10_mse_sum = 0, 0.0, 0.0
    shown: dict[str, list] = {"images": [], "recon": [], "captions": []}
    for batch in batches:
        keep = batch["valid"].bool()
        if num_images is not None:
            keep &= torch.cumsum(keep.long(), 0) <= num_images - done
        idx = keep.nonzero().flatten()
        if idx.numel() == 0:
            if num_images is not None and done >= num_images:
                break
            continue
        images = batch["images"].index_select(0, idx).float()
        recon = reconstruct(vae, images.to(device), schedule).cpu().float()
        l1_sum += (recon - images).abs().mean((1, 2, 3)).sum().item()
        log10_mse_sum += ((recon - images) / 2).pow(2).mean((1, 2, 3)).clamp_min(1e-10).log10().sum().item()
        for j, i in enumerate(idx.tolist()):
            meta = batch["meta"][i]
            words, polygons = list(meta.get("words") or []), list(meta.get("polygons") or [])
            ocr["recon_"].update(to_uint8_rgb(recon[j]), words, polygons)
            ocr["gt_"].update(to_uint8_rgb(images[j]), words, polygons)
        if len(shown["captions"]) < num_examples:
            take = slice(0, num_examples - len(shown["captions"]))
            shown["images"].append(images[take])
            shown["recon"].append(recon[take])
            shown["captions"] += [batch["captions"][i] for i in idx.tolist()][take]
        done += idx.numel()
    if done == 0:
        raise ValueError("the eval set yielded no valid images")
    metrics: dict[str, float | int | None] = {"recon_images": done, "recon_l1": l1_sum / done}
    # PSNR of [0, 1] images, averaged per image in dB.
    metrics["recon_psnr"] = -10.0 * log10_mse_sum / done
    for prefix, acc in ocr.items():
        metrics.update(acc.compute(prefix))
    if out_dir is not None and shown["captions"]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        panel = column_panel(
            [torch.cat(shown["images"]), torch.cat(shown["recon"])],
            shown["captions"],
            ("original", "reconstruction"),
        )
        panel.save(out / "reconstructions.png")
        (out / "reconstruction_metrics.json").write_text(json.dumps(metrics, indent=1))
    logger.info(
        "tokenizer reconstructions of %d images: Sen.ACC %.3f (originals %.3f), L1 %.4f, PSNR %.2f dB",
        done,
        metrics.get("recon_sen_acc") or 0.0,
        metrics.get("gt_sen_acc") or 0.0,
        metrics["recon_l1"],
        metrics["recon_psnr"],
    )
    return metrics
