"""Sample from a CAR checkpoint: `python sample.py ckpt=<export dir or .ckpt> layout=layout.yaml`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    """Compose -> scenetxtvar.inference.run_sample."""
    from scenetxtvar.inference import run_sample

    run_sample(cfg)


if __name__ == "__main__":
    main()
