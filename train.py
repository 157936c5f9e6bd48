"""Train the CAR branch of an InfinityPilot: `python train.py` (demo) or `python train.py model=2b vae=bsq`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Compose -> scenetxtvar.training.run; returns the optimised metric for sweepers."""
    from scenetxtvar.training.run import run

    metrics = run(cfg)["metrics"]
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
