"""Training: the LightningModule, callbacks and the Hydra entry point `run`."""
