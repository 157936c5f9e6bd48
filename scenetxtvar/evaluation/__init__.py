"""Evaluation: OCR accuracy (AnyText's Sen.ACC / NED), control fidelity, FID/KID/CLIPScore, the report.

- :mod:`.ocr`: ``TextRecognizer`` (RapidOCR, offline), ``crop_polygon``, ``OCRAccuracy``, ``line_metrics``.
- :mod:`.fidelity`: ``glyph_iou``, ``extract_text_mask``, ``edge_f1`` / ``canny_f1``, ``normal_agreement``.
- :mod:`.image_metrics`: ``ImageMetrics`` (torchmetrics, local weights only; notices otherwise).
- :mod:`.report`: ``write_report`` (metrics.json + metrics.md), ``log_to_loggers``.
- :mod:`.runner`: ``run_evaluation(cfg)``, what ``evaluate.py`` calls.
"""

from __future__ import annotations

from typing import Any


def run_evaluation(cfg: Any) -> dict[str, Any]:
    """Evaluate a checkpoint as ``cfg`` (conf/evaluate.yaml) describes; see :mod:`.runner`."""
    from .runner import run_evaluation as _run

    return _run(cfg)


__all__ = ["run_evaluation"]
