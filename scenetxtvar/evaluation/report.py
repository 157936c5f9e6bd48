"""The evaluation report: ``metrics.json`` (flat numbers + notices + run info), ``metrics.md``, logger output."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# (label, metric prefix) of the OCR table's rows.
OCR_ROWS = (
    ("generated, with control", ""),
    ("base model, no control (lower bound)", "nocontrol_"),
    ("ground-truth images (upper bound)", "gt_"),
)
OCR_COLUMNS = (
    ("Sen.ACC", "sen_acc"),
    ("NED", "ned"),
    ("Sen.ACC (ci)", "sen_acc_ci"),
    ("NED (ci)", "ned_ci"),
    ("glyph IoU", "glyph_iou"),
    ("canny F1", "canny_f1"),
    ("normal edge F1", "normal_edge_f1"),
    ("normal cos", "normal_cosine"),
    ("lines", "num_lines"),
)


GT_PREFIX = "gtprefix"  # metric prefix of the eval.gt_prefix_scales rows: gtprefix{k}_sen_acc, ...
GT_PREFIX_ROW = re.compile(GT_PREFIX + r"(\d+)_sen_acc")


def ocr_rows(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The fixed rows, then one per ``eval.gt_prefix_scales`` entry: where along the scales legibility is lost."""
    ks = sorted(int(m.group(1)) for key in metrics if (m := GT_PREFIX_ROW.fullmatch(key)))
    return [*OCR_ROWS, *((f"first {k} scales from the ground truth, the rest sampled", f"{GT_PREFIX}{k}_") for k in ks)]


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: floats rounded, None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return lines


def markdown_report(metrics: Mapping[str, Any], info: Mapping[str, Any], notices: Sequence[str]) -> str:
    """The human-readable report: OCR / fidelity rows, teacher-forced loss per scale, image metrics, notices."""
    ckpt = info.get("checkpoint") or {}
    lines = [
        "# Evaluation",
        "",
        f"- checkpoint: `{ckpt.get('path', 'none (untrained branch)')}`"
        + (f" (sha256 `{ckpt['sha256'][:16]}…`)" if ckpt.get("sha256") else ""),
        f"- model: {info.get('model', '?')}, conditions {info.get('conditions', '?')}",
        f"- data: {info.get('data', '?')}, {metrics.get('num_images', 0)} images",
        f"- sampling: {info.get('sampling', {})}",
        "",
        f"## Text accuracy and control fidelity ({info.get('ocr', 'OCR')})",
        "",
    ]
    ocr = ocr_rows(metrics)
    columns = [(label, key) for label, key in OCR_COLUMNS if any(f"{p}{key}" in metrics for _, p in ocr)]
    rows = []
    for label, prefix in ocr:
        if f"{prefix}sen_acc" in metrics or f"{prefix}glyph_iou" in metrics:
            rows.append([label, *(metrics.get(f"{prefix}{key}") for _, key in columns)])
    lines += _table(["row", *(label for label, _ in columns)], rows)
    scales = sorted(int(k[len("val_loss_s") :]) for k in metrics if k.startswith("val_loss_s"))
    if "val_loss" in metrics:
        lines += ["", "## Teacher-forced validation (with control)", ""]
        tf_rows = [["all", metrics.get("val_loss"), metrics.get("val_acc"), metrics.get("val_token_acc")]]
        tf_rows += [[f"scale {k}", metrics.get(f"val_loss_s{k}"), metrics.get(f"val_acc_s{k}"), None] for k in scales]
        lines += _table(["scales", "loss", "bit accuracy", "token accuracy"], tf_rows)
    lines += ["", "## Image metrics", ""]
    lines += _table(
        ["FID", "KID (mean)", "KID (std)", "CLIPScore", "images"],
        [[metrics.get("fid"), metrics.get("kid_mean"), metrics.get("kid_std"), metrics.get("clip_score"),
          metrics.get("num_images")]],
    )  # fmt: skip
    if notices:
        lines += ["", "## Notices", ""] + [f"- {n}" for n in notices]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(
    run_dir: str | os.PathLike, metrics: Mapping[str, Any], info: Mapping[str, Any], notices: Sequence[str]
) -> dict[str, Path]:
    """Write ``metrics.json`` (metrics at the top level, plus ``notices`` and ``info``) and ``metrics.md``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    reserved = {"notices", "info"} & set(metrics)
    if reserved:
        raise ValueError(f"metric names {sorted(reserved)} are reserved in metrics.json")
    payload = {**metrics, "notices": list(notices), "info": dict(info)}
    paths = {"json": run_dir / "metrics.json", "markdown": run_dir / "metrics.md"}
    _atomic_write(paths["json"], json.dumps(payload, indent=1, ensure_ascii=False, default=str))
    _atomic_write(paths["markdown"], markdown_report(metrics, info, notices))
    logger.info("wrote %s and %s", paths["json"], paths["markdown"])
    return paths


def log_to_loggers(loggers: Sequence[Any], metrics: Mapping[str, Any], markdown: str | None = None) -> None:
    """Send the numeric metrics (as ``eval/<name>``) to Lightning loggers; wandb also gets the markdown report."""
    numeric = {
        f"eval/{k}": float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }
    for lg in loggers:
        lg.log_metrics(numeric, step=0)
        if type(lg).__name__ == "WandbLogger" and markdown is not None:
            import wandb

            lg.experiment.log({"eval/report": wandb.Html(f"<pre>{markdown}</pre>")}, step=0)
        lg.save()
        if type(lg).__name__ == "WandbLogger":
            lg.experiment.finish()
