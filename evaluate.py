"""Evaluate a CAR checkpoint: `python evaluate.py ckpt=<export dir or .ckpt> [eval.shards=DIR]`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    """Compose -> scenetxtvar.evaluation.run_evaluation; returns Sen.ACC (for sweepers)."""
    from scenetxtvar.evaluation import run_evaluation

    return run_evaluation(cfg).get("sen_acc")


if __name__ == "__main__":
    main()
