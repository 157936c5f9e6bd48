"""CAR-only exports, atomic Lightning checkpoints, and the FSDP2 strategy that resumes from CAR-only checkpoints."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.strategies.fsdp import _is_sharded_checkpoint
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy

from ..checkpoint import CAR_WEIGHTS, atomic_write, load_strict, save_state_dict, write_car_config
from ..models.pilot import is_car_key

logger = logging.getLogger(__name__)


def full_state_dict(module: torch.nn.Module, keep=lambda name: True) -> dict[str, torch.Tensor]:
    """The module's state dict with sharded (DTensor) entries gathered: a collective under FSDP2."""
    out = {}
    for name, t in module.state_dict().items():
        if keep(name):
            out[name] = t.full_tensor() if hasattr(t, "full_tensor") else t
    return out


def export_car(model, directory: str | os.PathLike, write: bool = True) -> Path | None:
    """Write ``car_weights.safetensors`` + ``car_config.json`` (every rank must call it under FSDP2)."""
    car = full_state_dict(model, is_car_key)
    if not write:
        return None
    directory = Path(directory)
    save_state_dict(car, directory / f"{CAR_WEIGHTS}.safetensors")
    write_car_config(model, directory)
    return directory


class _ExportOnCheckpoint(L.Callback):
    """Write a stage's weights whenever a checkpoint is saved and when training ends, once per step."""

    def __init__(self, export_dir: str | os.PathLike) -> None:
        self.export_dir = Path(export_dir)
        self._exported_step: int | None = None

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        raise NotImplementedError

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A save writes several checkpoints (the step's and last.ckpt), and training may end on a saved
        # step: the weights are the same, so write them once. The step is the same on every rank.
        if self._exported_step == trainer.global_step:
            return
        self._exported_step = trainer.global_step
        path = self.write(trainer, pl_module)
        if path is not None:
            logger.info("exported %s (step %d)", path, trainer.global_step)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._export(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._export(trainer, pl_module)


class CarExportCallback(_ExportOnCheckpoint):
    """Export the CAR branch (every rank takes part under FSDP2; rank 0 writes)."""

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        return export_car(pl_module.model, self.export_dir, write=trainer.is_global_zero)


class StageExportCallback(_ExportOnCheckpoint):
    """Export a non-CAR stage's weights through ``pl_module.export(directory, write)``."""

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        return pl_module.export(self.export_dir, write=trainer.is_global_zero)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic: temp file, fsync, rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        atomic_write(path, lambda fh: torch.save(checkpoint, fh))


class CarModelParallelStrategy(ModelParallelStrategy):
    """Lightning's FSDP2 strategy (``ModelParallelStrategy``) for modules whose checkpoints omit frozen weights.

    Two differences, both small:

    * ``data_parallel_size="auto"`` means all processes (world size / ``tensor_parallel_size``). Lightning's
      "auto" is the number of nodes, so ``tensor_parallel_size=1`` with several devices per node fails.
    * Resuming from a sharded checkpoint folder (``save_distributed_checkpoint=True``) when the module sets
      ``strict_loading=False``: Lightning asks torch.distributed.checkpoint for every tensor of the model
      and fails with "Missing key in checkpoint state_dict" on the frozen base that ``on_save_checkpoint``
      left out. Here only the tensors the folder holds are read, and every trainable parameter must be among
      them. Strict modules and single-file checkpoints take Lightning's own path.
    """

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto" and isinstance(self._tensor_parallel_size, int):
            self._data_parallel_size = max(1, self.num_nodes * self.num_processes // self._tensor_parallel_size)
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: str | os.PathLike, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path) or self.lightning_module.strict_loading:
            return super().load_checkpoint(path, weights_only=weights_only)
        from torch.distributed.checkpoint import FileSystemReader, load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        saved = {k.removeprefix("state_dict.") for k in FileSystemReader(path).read_metadata().state_dict_metadata}
        module = self.model
        missing = sorted(n for n, p in module.named_parameters() if p.requires_grad and n not in saved)
        if missing:
            raise KeyError(f"the checkpoint {path} lacks {len(missing)} trainable tensors, e.g. {missing[:5]}")
        present = {k: v for k, v in get_model_state_dict(module).items() if k in saved}
        load({"state_dict": present}, checkpoint_id=path)
        # Partial by design: the frozen base is not in the checkpoint (it comes from model.build.base_weights).
        # Exactly the frozen tensors may be absent; anything else missing, unexpected or mis-shaped is an error.
        frozen = tuple(n for n, t in get_model_state_dict(module).items() if n not in saved and not t.requires_grad)
        load_strict(module, present, f"sharded checkpoint {path}", allow_missing=frozen)
        for idx, optimizer in enumerate(self.optimizers):  # as Lightning does: optimizer states separately
            key = f"optimizer_{idx}"
            optim_state = {key: get_optimizer_state_dict(module, optimizer)}
            load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(
                module, optimizer, optim_state_dict=optim_state[key], options=StateDictOptions(cpu_offload=True)
            )
        # Lightning's own metadata file (loops, epoch, ...): read it as Lightning does, safe by default.
        return torch.load(path / _METADATA_FILENAME, weights_only=True if weights_only is None else weights_only)
