"""Lightning's EMA of the weights, made picklable so that spawned DDP workers can take it."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging


@torch.no_grad()
def ema_update(decay: float, average: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
    """``decay * average + (1 - decay) * current`` (torch.optim.swa_utils.get_ema_avg_fn's rule)."""
    return average.lerp(current, 1.0 - decay)


class EMA(EMAWeightAveraging):
    """:class:`~lightning.pytorch.callbacks.EMAWeightAveraging` whose averaging function pickles.

    Lightning's builds it as a closure, and ``strategy.start_method=spawn`` pickles the trainer's callbacks
    into every worker: a module-level function with the decay bound by ``partial`` goes through.
    """

    def __init__(self, decay: float = 0.999, **kwargs: Any) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        super().__init__(decay=decay, **kwargs)
        self._kwargs["avg_fn"] = partial(ema_update, float(decay))
