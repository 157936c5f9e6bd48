"""evaluate.py's logic: generate over an eval set, then OCR, control fidelity, teacher-forced and image metrics."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..inference import SampleSettings, _container, load_model_and_vae, sample_batch
from .fidelity import canny_edges, control_mask, edge_f1, glyph_iou, mean_or_none, normal_agreement, to_uint8_rgb
from .image_metrics import ImageMetrics
from .ocr import OCR_LABEL, OCRAccuracy, get_recognizer
from .report import GT_PREFIX, log_to_loggers, markdown_report, write_report

logger = logging.getLogger(__name__)

# Reference rows: metric prefix -> which images.
ROWS = {"": "generated", "nocontrol_": "base model without control", "gt_": "ground truth"}


def eval_datamodule(cfg: Any, batch_size: int, num_images: int | None, shards: Any = None):
    """The eval set's DataModule: ``shards`` / ``eval.shards`` / ``shards``, else the data group's val split
    (for the synthetic data: the held-out set the demo makes, generated on first use and cached)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from ..data.datamodule import SceneTextDataModule

    shards = _container(shards or OmegaConf.select(cfg, "eval.shards") or OmegaConf.select(cfg, "shards"))
    common = dict(batch_size=batch_size, val_batch_size=batch_size, num_workers=0, val_samples=num_images)
    if shards:
        return SceneTextDataModule(
            val_shards=shards,
            conditions=list(cfg.condition.names),
            mask_conditions=list(cfg.condition.get("masks") or []),
            pn=OmegaConf.select(cfg, "schedule.pn"),
            image_size=_container(OmegaConf.select(cfg, "schedule.image_size")),
            h_div_w_templates=_container(OmegaConf.select(cfg, "schedule.templates")),
            seed=int(cfg.seed),
            **common,
        )
    target = str(OmegaConf.select(cfg, "data._target_") or "")
    if target.endswith("synthetic_datamodule"):
        # Only the val split matters; a small train split keeps the first run quick (its cache dir differs).
        return instantiate(cfg.data, num_train=min(int(cfg.data.num_train), 8), **common)
    if not OmegaConf.select(cfg, "data.val_shards"):
        raise ValueError("no eval data: set eval.shards=<shard dir>, or data.val_shards, or use data=synthetic")
    return instantiate(cfg.data, train_shards=None, **common)


def _subset(batch: dict[str, Any], keep: Tensor) -> dict[str, Any]:
    """The rows of a batch where ``keep`` is True."""
    idx = torch.nonzero(keep).flatten()
    rows = idx.tolist()
    out = dict(batch)
    out["images"] = batch["images"][idx]
    out["controls"] = batch["controls"][idx]
    out["captions"] = [batch["captions"][i] for i in rows]
    out["meta"] = [batch["meta"][i] for i in rows]
    out["valid"] = torch.ones(len(rows), dtype=torch.bool)
    return out


class _Mean:
    """Weighted running means of scalar statistics."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)

    def add(self, stats: dict[str, Any], weight: float) -> None:
        for k, v in stats.items():
            self.sums[k] += float(v) * weight
            self.weights[k] += weight

    def means(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": self.sums[k] / self.weights[k] for k in self.sums if self.weights[k] > 0}


def gt_prefix_key(k: int) -> str:
    """Metric prefix of the row sampled with the first ``k`` scales taken from the ground truth."""
    return f"{GT_PREFIX}{k}_"


def ground_truth_labels(module: Any, batch: dict[str, Any], sched: Any, k: int) -> list[Tensor]:
    """The clean per-scale labels of the batch's images (the tokenizer's codes), for the first ``k`` scales."""
    if not 1 <= k <= len(sched):
        raise ValueError(f"eval.gt_prefix_scales entries must be between 1 and the {len(sched)} scales, got {k}")
    with torch.no_grad():
        features = module.vae.encode_for_raw_features(batch["images"].to(module.device))
        return module.codes.targets(features, sched).per_scale[:k]


def run_evaluation(cfg: Any) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt`` on the eval set; writes metrics.json / metrics.md (+ examples), returns the metrics."""
    from omegaconf import OmegaConf
    from tqdm.auto import tqdm

    from ..training.panels import make_panel

    started = time.perf_counter()
    run_dir = Path(OmegaConf.select(cfg, "paths.run_dir"))
    run_dir.mkdir(parents=True, exist_ok=True)
    ev = cfg.eval
    settings = SampleSettings.from_mapping(_container(cfg.sampling), use_control=True)
    num_images = cfg.get("num_images")
    num_images = None if num_images is None else int(num_images)
    if num_images is not None and num_images < 1:
        raise ValueError(f"num_images must be >= 1 (or null for the whole set), got {num_images}")
    batch_size = int(cfg.batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    kit = load_model_and_vae(cfg)
    module, model, vae = kit.module, kit.model, kit.vae
    conditions = kit.conditions
    slot = {name: 3 * i for i, name in enumerate(conditions)}
    notices: list[str] = []
    if "glyph" not in slot:
        notices.append(f"glyph IoU skipped: the model's conditions {conditions} have no glyph mask")
    estimator = None
    if "normal" in slot:
        if ev.get("normal_estimator"):
            from hydra.utils import instantiate

            estimator = instantiate(ev.normal_estimator)
        else:
            notices.append(
                "normal angular error skipped: no normal estimator configured (eval.normal_estimator); "
                "normal_edge_f1 compares image edges with the normal map's edges instead"
            )
    other = [c for c in conditions if c not in ("glyph", "canny", "normal")]
    if other:
        notices.append(f"no fidelity measure for the conditions {other}")

    dm = eval_datamodule(cfg, batch_size, num_images)
    dm.setup("validate")
    loader = dm.val_dataloader()
    recognizer = get_recognizer()
    prefix_scales = sorted({int(k) for k in ev.get("gt_prefix_scales") or []})
    rows = [""] + (["nocontrol_"] if ev.nocontrol else []) + (["gt_"] if ev.ground_truth else [])
    rows += [gt_prefix_key(k) for k in prefix_scales]
    ocr = {p: OCRAccuracy(recognizer, strip_spaces=ev.strip_spaces, map_unknown=ev.map_unknown) for p in rows}
    fidelity: dict[str, list[float | None]] = defaultdict(list)
    teacher = _Mean()
    metrics_cfg = cfg.get("metrics") or {}
    image_metrics = ImageMetrics(
        fid_weights=metrics_cfg.get("fid_weights"),
        clip_model=metrics_cfg.get("clip_model"),
        kid_subset_size=int(metrics_cfg.get("kid_subset_size", 50)),
        clip_prefix=str(metrics_cfg.get("clip_prefix", "")),
        device=module.device,
    )
    examples: dict[str, list] = defaultdict(list)
    num_examples = int(ev.get("num_examples", 0))
    done = 0
    for batch in tqdm(loader, desc="evaluating", unit="batch", disable=not cfg.get("progress", True)):
        keep = batch["valid"].bool().clone()
        if num_images is not None:
            keep &= torch.cumsum(keep.long(), 0) <= num_images - done
        if not keep.any():
            continue
        batch = _subset(batch, keep)
        b = batch["images"].shape[0]
        sched = module.schedule_for(batch)
        text = kit.text_encoder.encode(list(batch["captions"]))
        seed = settings.seed + done
        generated = sample_batch(model, vae, text, sched, batch["controls"], seed, settings)
        outputs = {"": generated, "gt_": batch["images"]}
        if ev.nocontrol:
            outputs["nocontrol_"] = sample_batch(model, vae, text, sched, None, seed, settings)
        if prefix_scales:
            labels = ground_truth_labels(module, batch, sched, max(prefix_scales))
            for k in prefix_scales:
                outputs[gt_prefix_key(k)] = sample_batch(
                    model, vae, text, sched, batch["controls"], seed, settings, gt_labels=labels[:k]
                )
        if ev.teacher_forced:
            device_batch = {**batch, **{k: batch[k].to(module.device) for k in ("images", "controls", "valid")}}
            with torch.no_grad():
                stats = module.compute_loss(device_batch, noise=False, drop_control=False)
            teacher.add({k: float(v) for k, v in stats.items() if k != "tokens"}, b)
        for j in range(b):
            meta = batch["meta"][j]
            words, polygons = list(meta.get("words") or []), list(meta.get("polygons") or [])
            control = batch["controls"][j]
            for prefix in rows:
                image = to_uint8_rgb(outputs[prefix][j])
                ocr[prefix].update(image, words, polygons)
                if "glyph" in slot:
                    glyph = control_mask(control[slot["glyph"]])
                    fidelity[f"{prefix}glyph_iou"].append(glyph_iou(image, glyph))
                if "canny" in slot:
                    target = control_mask(control[slot["canny"]])
                    fidelity[f"{prefix}canny_f1"].append(edge_f1(canny_edges(image), target)["f1"])
                if "normal" in slot:
                    normals = control[slot["normal"] : slot["normal"] + 3]
                    target = canny_edges(to_uint8_rgb(normals))
                    fidelity[f"{prefix}normal_edge_f1"].append(edge_f1(canny_edges(image), target)["f1"])
                    if estimator is not None:
                        pred = estimator(outputs[prefix][j : j + 1].to(module.device))[0].cpu()
                        fidelity[f"{prefix}normal_cosine"].append(normal_agreement(pred, normals)["mean_cosine"])
        image_metrics.update(batch["images"], generated, list(batch["captions"]))
        if len(examples["captions"]) < num_examples:
            take = slice(0, num_examples - len(examples["captions"]))
            examples["controls"].append(batch["controls"][take])
            examples["images"].append(batch["images"][take])
            examples["generated"].append(generated[take])
            base = outputs.get("nocontrol_")
            examples["nocontrol"].append(base[take] if base is not None else torch.zeros_like(generated[take]))
            examples["captions"] += list(batch["captions"][take])
        done += b
    if done == 0:
        raise ValueError("the eval set yielded no valid images")
    if num_images is not None and done < num_images:
        notices.append(f"the eval set has only {done} images (num_images={num_images})")

    metrics: dict[str, Any] = {"num_images": done}
    for prefix in rows:
        metrics.update(ocr[prefix].compute(prefix))
    metrics.update({k: mean_or_none(v) for k, v in fidelity.items()})
    metrics.update(teacher.means("val_"))
    metrics.update(image_metrics.compute())
    notices += list(image_metrics.notices.values())
    for key in ("sen_acc", "ned", "glyph_iou", "gt_sen_acc", "gt_ned", "nocontrol_sen_acc"):
        metrics.setdefault(key, None)

    if examples["captions"]:
        panel = make_panel(
            torch.cat(examples["controls"]),
            torch.cat(examples["images"]),
            torch.cat(examples["generated"]),
            torch.cat(examples["nocontrol"]),
            examples["captions"],
        )
        (run_dir / "examples").mkdir(exist_ok=True)
        panel.save(run_dir / "examples" / "panel.png")
    info = {
        "checkpoint": kit.checkpoint.as_dict() if kit.checkpoint else None,
        "model": OmegaConf.select(cfg, "model.preset"),
        "conditions": conditions,
        "data": _container(OmegaConf.select(cfg, "eval.shards")) or f"{OmegaConf.select(cfg, 'data._target_')} (val)",
        "sampling": settings.as_dict(),
        "ocr": OCR_LABEL,
        "ocr_predictions": {p or "generated": ocr[p].predictions[:50] for p in rows},
        "seconds": round(time.perf_counter() - started, 2),
        "device": str(module.device),
    }
    write_report(run_dir, metrics, info, notices)
    loggers = _loggers(cfg, run_dir)
    if loggers:
        log_to_loggers(loggers, metrics, markdown_report(metrics, info, notices))
    summary = ", ".join(
        f"{k}={v:.4f}" for k, v in metrics.items() if k in ("sen_acc", "ned", "glyph_iou") and v is not None
    )
    logger.info("evaluation of %d images done in %.1f s: %s", done, info["seconds"], summary)
    return metrics


def _loggers(cfg: Any, run_dir: Path) -> list:
    """The configured Lightning loggers (wandb offline unless configured otherwise)."""
    if not cfg.get("logger"):
        return []
    from ..training.run import build_loggers

    return build_loggers(cfg, run_dir)
