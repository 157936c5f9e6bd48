"""``run(cfg)``: compose the data, the module, the callbacks, the loggers and the Trainer, then fit."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .allocator import keep_freed_memory
from .builders import KNOWN_CONDITIONS, require_file
from .export import AtomicCheckpointIO, CarExportCallback, StageExportCallback, export_car
from .module import PilotModule

logger = logging.getLogger(__name__)

# stage=car trains the control branch (the product's job); tokenizer and base train what it stands on.
STAGES = ("car", "base", "tokenizer")
# Callbacks that read an InfinityPilot; other stages leave them out.
_PILOT_CALLBACKS = ("ParameterDriftCallback", "SamplePanelCallback")


def synthetic_datamodule(
    cache_dir: str,
    num_train: int,
    num_val: int,
    size: Any,
    seed: int,
    workers: int,
    conditions: list[str],
    min_words: int = 1,
    max_words: int = 3,
    background_kinds: list[str] | None = None,
    **datamodule_kwargs: Any,
):
    """Generate the embedded synthetic shards on first use (cached), then stream them.

    ``background_kinds`` restricts the generated backgrounds (None: all kinds); it is part of the cache key.
    """
    from ..data.datamodule import SceneTextDataModule
    from ..data.synthetic import check_background_kinds, generate_synthetic_shards

    size_tag = "x".join(map(str, size)) if isinstance(size, (list, tuple)) else str(size)
    tag = f"{size_tag}-w{min_words}-{max_words}-s{seed}-{'_'.join(conditions)}"
    if background_kinds is not None:
        kinds = list(check_background_kinds(background_kinds))
        tag += f"-bg_{'_'.join(kinds)}"
    splits = {"train": (num_train, seed), "val": (num_val, seed + 10_000)}
    dirs = {}
    for split, (num, split_seed) in splits.items():
        if split == "val" and num == 0:  # data.num_val=0: no validation split (num_train=0 fails below)
            continue
        out = Path(cache_dir) / f"{split}-{num}-{tag}"
        if not (out / "manifest.json").exists():
            logger.info("generating %d synthetic %s samples into %s", num, split, out)
            generate_synthetic_shards(
                out,
                num,
                size=size,
                seed=split_seed,
                workers=workers,
                conditions=conditions,
                min_words=min_words,
                max_words=max_words,
                background_kinds=background_kinds,
                shard_size=max(8, num // 4),
                overwrite=True,
            )
        dirs[split] = str(out)
    return SceneTextDataModule(
        train_shards=dirs["train"],
        val_shards=dirs.get("val"),
        conditions=conditions,
        seed=seed,
        **datamodule_kwargs,
    )


def num_processes(trainer: DictConfig) -> int:
    """Processes that ``trainer.devices`` x ``trainer.num_nodes`` asks for (``auto`` / -1: the GPUs, 1 on a CPU)."""
    devices = trainer.get("devices", 1)
    if isinstance(devices, str) and "," in devices:  # "0,1": device indices
        devices = [d for d in devices.split(",") if d.strip()]
    elif devices in ("auto", -1, "-1"):
        on_gpu = str(trainer.get("accelerator", "auto")) in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        devices = torch.cuda.device_count() if on_gpu else 1
    count = int(devices) if isinstance(devices, (int, str)) else len(devices)
    return count * int(trainer.get("num_nodes", 1))


def validate_config(cfg: DictConfig) -> None:
    """Nonsense overrides fail here, before anything big is built or trained."""
    names = list(cfg.condition.names)
    unknown = [n for n in names if n not in KNOWN_CONDITIONS]
    if unknown:
        raise ValueError(
            f"unknown condition(s) {unknown}: choose from {list(KNOWN_CONDITIONS)} "
            "(or add the type to builders.KNOWN_CONDITIONS if your shards carry it)"
        )
    stage = cfg.get("stage", "car")
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {list(STAGES)}, got {stage!r}")
    # What each stage reads; the base stage writes the base weights and the tokenizer stage the tokenizer.
    inputs = {
        "car": ("model.build.base_weights", "model.build.car_weights", "vae.build.path", "text.path"),
        "base": ("vae.build.path", "text.path"),
        "tokenizer": (),
    }[stage]
    for key, what in (
        ("model.build.base_weights", "Infinity base weights"),
        ("model.build.car_weights", "CAR weights"),
        ("vae.build.path", "tokenizer weights"),
        ("text.path", "Flan-T5 directory"),
    ):
        if key not in inputs:
            continue
        value = OmegaConf.select(cfg, key)
        if value:
            require_file(value, key, what)
    global_batch = cfg.get("global_batch_size")
    if global_batch is not None:
        world = num_processes(cfg.trainer)
        if global_batch % world:
            raise ValueError(
                f"global_batch_size={global_batch} is not divisible by the {world} devices "
                "(trainer.devices x trainer.num_nodes)"
            )
    if cfg.vae.kind == "vq" and not cfg.schedule.get("image_size"):
        raise ValueError("vae=vq predicts VAR's square patch-number schedule: use schedule=var256")


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[L.Callback]:
    """Configured callbacks (Hydra targets) plus the stage's export (CAR branch, base or tokenizer)."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if not cfg.get("logger"):  # the LR monitor needs a logger
        callbacks = [c for c in callbacks if type(c).__name__ != "LearningRateMonitor"]
    if cfg.get("stage", "car") == "car":
        callbacks.append(CarExportCallback(run_dir / "export"))
    else:
        callbacks = [c for c in callbacks if type(c).__name__ not in _PILOT_CALLBACKS]
        callbacks.append(StageExportCallback(run_dir / "export"))
    return callbacks


def _schedule_scales(cfg: DictConfig) -> list | None:
    """``schedule.scales``: explicit scales for custom image sizes whose batches carry no schedule."""
    scales = OmegaConf.select(cfg, "schedule.scales")
    return OmegaConf.to_container(scales, resolve=True) if scales else None


def build_module(cfg: DictConfig) -> L.LightningModule:
    """The LightningModule of ``cfg.stage``."""
    stage = cfg.get("stage", "car")
    common = dict(
        vae=OmegaConf.to_container(cfg.vae.build, resolve=True),
        conditions=list(cfg.condition.names),
        schedule=_schedule_scales(cfg),
    )
    conv_precision = resolve_conv_precision(cfg.get("conv_precision", "fp32"))
    feature_cache = int(cfg.vae.get("cache_samples", 0) or 0)
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    if stage == "tokenizer":
        from .tokenizer_stage import TokenizerModule

        conf = OmegaConf.to_container(cfg.get("tokenizer_stage") or {}, resolve=True)
        return TokenizerModule(
            **common,
            optim={**optim, **(conf.get("optim") or {})},
            loss=conf.get("loss"),
            adversarial=conf.get("adversarial"),
        )
    model = OmegaConf.to_container(cfg.model.build, resolve=True)
    text = OmegaConf.to_container(cfg.text, resolve=True)
    loss = OmegaConf.to_container(cfg.loss, resolve=True)
    if stage == "base":
        from .base_stage import BaseModule

        conf = OmegaConf.to_container(cfg.get("base_stage") or {}, resolve=True)
        return BaseModule(
            model=model,
            text=text,
            loss=loss,
            optim={**optim, **(conf.get("optim") or {})},
            activation_checkpointing=cfg.model.get("activation_checkpointing", False),
            conv_precision=conv_precision,
            feature_cache=feature_cache,
            **common,
        )
    return PilotModule(
        model=model,
        text=text,
        optim=optim,
        loss=loss,
        control_dropout=cfg.control_dropout,
        activation_checkpointing=cfg.model.get("activation_checkpointing", False),
        conv_precision=conv_precision,
        feature_cache=feature_cache,
        **common,
    )


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    """wandb (offline unless configured), CSV, or nothing."""
    loggers = []
    for conf in (cfg.get("logger") or {}).values():
        if conf is None:
            continue
        if "WandbLogger" in str(conf.get("_target_", "")):
            os.environ.setdefault("WANDB_MODE", "offline" if conf.get("offline", True) else "online")
            Path(conf.save_dir).mkdir(parents=True, exist_ok=True)
        loggers.append(instantiate(conf))
    return loggers


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AMX tiles or AVX512-BF16), so bf16 autocast is faster.

    oneDNN also *supports* bf16 on plain AVX-512 by emulation (``torch.ops.mkldnn._is_mkldnn_bf16_supported``
    is true there), but slowly: on a 2-core AVX-512 Xeon without AMX the demo tokenizer's step takes
    0.27 s in bf16 vs 0.12 s in fp32, while with AMX bf16 makes it 2.3x faster. So ask for the instructions.
    """
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    try:
        return any(bool(getattr(torch.cpu, name)()) for name in probes if hasattr(torch.cpu, name))
    except RuntimeError:
        return False


def resolve_precision(precision: str) -> str:
    """Lightning's precision for ``trainer.precision``; two values of ours, the rest passed through.

    ``auto``: bf16 autocast on GPUs, full fp32 on CPU (a small transformer's CPU step is no faster in
    bf16). ``auto-bf16``: bf16 autocast on GPUs and on CPUs with native bf16 as well -- for conv nets
    such as the tokenizer, whose CPU step it makes 1.8x faster (2.3x with channels-last;
    ``benchmarks/bench_tokenizer_train.py``).
    """
    if precision == "auto":
        return "bf16-mixed" if torch.cuda.is_available() else "32-true"
    if precision == "auto-bf16":
        return "bf16-mixed" if torch.cuda.is_available() or cpu_has_fast_bf16() else "32-true"
    return precision


def resolve_conv_precision(setting: str) -> str:
    """``conv_precision`` -> ``fp32`` or ``bf16``: the dtype of the convolutions around the transformer.

    ``auto``: bf16 on GPUs and on CPUs with native bf16. On this demo's CPU the control stem and the frozen
    tokenizer's encode are about a fifth of a CAR step and run 1.5-2x faster in bf16, while the small
    transformer itself gains nothing (``trainer.precision=auto`` keeps it fp32 on CPU).
    """
    if setting not in ("fp32", "bf16", "auto"):
        raise ValueError(f"conv_precision must be fp32, bf16 or auto, got {setting!r}")
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() or cpu_has_fast_bf16() else "fp32"
    return setting


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list, loggers: list) -> L.Trainer:
    """Lightning's Trainer with the configured strategy and atomic checkpoints."""
    strategy_cfg = cfg.strategy
    strategy = instantiate(strategy_cfg) if "_target_" in strategy_cfg else strategy_cfg.get("name", "auto")
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    precision = resolve_precision(trainer_kwargs.pop("precision", "auto"))
    plugins = [AtomicCheckpointIO()] if isinstance(strategy, str) or "DDP" in type(strategy).__name__ else []
    return L.Trainer(
        default_root_dir=str(run_dir),
        strategy=strategy,
        precision=precision,
        callbacks=callbacks,
        logger=loggers or False,
        plugins=plugins,
        **trainer_kwargs,
    )


class FinalStepCallback(L.Callback):
    """Hands the trained step count back to the main process under Lightning's spawn launcher.

    With ``strategy.start_method=spawn`` the workers train and the main process's Trainer never steps; of the
    worker's state it receives the weights and ``callback_metrics``, so the step count travels there.
    """

    key = "_final_global_step"

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.callback_metrics[self.key] = torch.tensor(trainer.global_step)


def trained_steps(trainer: L.Trainer) -> int:
    """The fit's final global step (the worker's one after a spawned fit); removes the hand-over metric."""
    step = trainer.callback_metrics.pop(FinalStepCallback.key, None)
    return int(step) if step is not None else trainer.global_step


def _finish_wandb(trainer: L.Trainer) -> None:
    """Close this run's wandb run, so the next job of a multirun gets its own."""
    if any(type(lg).__name__ == "WandbLogger" for lg in trainer.loggers):
        import wandb

        wandb.finish()


# The frozen base is in eval mode on purpose (no drop-path noise in a frozen network); Lightning warns.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train (or resume) the stage ``cfg.stage`` describes (CAR branch by default); returns final metrics and paths."""
    validate_config(cfg)
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("deterministic_algorithms"):
        torch.use_deterministic_algorithms(True, warn_only=True)
    if cfg.get("keep_freed_memory", True):  # before the loader workers fork: they inherit it
        keep_freed_memory()
    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    callbacks = [*build_callbacks(cfg, run_dir), FinalStepCallback()]
    trainer = build_trainer(cfg, run_dir, callbacks, build_loggers(cfg, run_dir))
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    global_step = trained_steps(trainer)
    if isinstance(module, PilotModule):
        export_car(module.model, run_dir / "export", write=trainer.is_global_zero)
    else:
        module.export(run_dir / "export", write=trainer.is_global_zero)
    _finish_wandb(trainer)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    result = {
        "run_dir": str(run_dir),
        "export_dir": str(run_dir / "export"),
        "checkpoint_dir": str(run_dir / "checkpoints"),
        "stage": cfg.get("stage", "car"),
        "global_step": global_step,
        "metrics": metrics,
    }
    logger.info("finished: %s", result)
    return result
