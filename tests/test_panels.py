"""Sample panels: the pure panel builder, the callback on fake objects, and a real Lightning run of both callbacks."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from PIL import Image
from test_drift import SCHEDULE as DRIFT_SCHEDULE
from test_drift import _one_thread, make_pilot  # noqa: F401 (autouse fixture)
from torch import nn

from scenetxtvar.scales import get_schedule
from scenetxtvar.text import as_packed_text
from scenetxtvar.training.drift import ParameterDriftCallback
from scenetxtvar.training.panels import COLUMN_TITLES, SamplePanelCallback, make_panel, take_samples, to_uint8

SCHEDULE = DRIFT_SCHEDULE[:3]  # up to 4x4 tokens: 64x64 images keep sampling cheap


def test_make_panel_layout_and_pixel_mapping():
    n, h, w = 2, 32, 48
    control = torch.full((n, 1, 16, 24), -1.0)  # one channel at another size: repeated and resized
    gt = torch.ones(n, 3, h, w)
    with_control = torch.zeros(n, 3, h, w)
    without = torch.full((n, 4, h, w), -1.0)  # extra channels are ignored
    without[:, 0] = 1.0
    panel = make_panel(control, gt, with_control, without, ["a caption", "a much longer caption " * 20])
    assert isinstance(panel, Image.Image) and panel.mode == "RGB"
    assert panel.size == (4 * w + 5 * 4, 18 + n * (h + 16 + 4) + 4)
    y = 18 + (h + 16 + 4) + h // 2  # middle of the second row
    centres = [panel.getpixel((4 + c * (w + 4) + w // 2, y)) for c in range(4)]
    assert centres == [(0, 0, 0), (255, 255, 255), (128, 128, 128), (255, 0, 0)]
    assert to_uint8(torch.zeros(3, 2, 2)).dtype.name == "uint8"
    with pytest.raises(ValueError, match="same number of rows"):
        make_panel(control, gt, with_control, without, ["one caption"])


def test_take_samples_prefers_valid_rows_and_copies_to_cpu():
    batch = {
        "images": torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2),
        "controls": torch.zeros(4, 3, 2, 2),
        "captions": ["a", "b", "c", "d"],
        "schedule": [(1, 1, 1)],
        "valid": torch.tensor([False, True, False, True]),
    }
    s = take_samples(batch, 3)
    assert s["captions"] == ["b", "d", "a"] and s["images"][:, 0, 0, 0].tolist() == [1.0, 3.0, 0.0]
    assert s["schedule"] == [(1, 1, 1)] and s["images"].data_ptr() != batch["images"].data_ptr()


class FakeVAE(nn.Module):
    """Decodes 8-bit codes to an image: enough for the sampler's ``vae.decode``."""

    code_dim = 8

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.interpolate(z[:, :3], scale_factor=16))


class FakeText:
    def encode(self, prompts):
        g = torch.Generator().manual_seed(len(prompts))
        lens = [3 + len(p) % 4 for p in prompts]
        return as_packed_text((torch.randn(sum(lens), 128, generator=g), lens, None, None))


class FakePilotModule(nn.Module):
    """What the panel callback uses of a PilotModule."""

    def __init__(self) -> None:
        super().__init__()
        self.model = make_pilot()
        self.vae = FakeVAE()
        self.text_encoder = FakeText()
        self.device = torch.device("cpu")

    def schedule_for(self, batch):
        return batch["schedule"]


class FakeWandb(WandbLogger):
    """A WandbLogger that records instead of starting wandb."""

    def __init__(self) -> None:
        self.images: list[tuple[str, list, int, dict]] = []

    def log_image(self, key, images, step=None, **kwargs) -> None:
        self.images.append((key, images, step, kwargs))


def fake_batch(b: int = 3):
    _, h, w = SCHEDULE[-1]
    g = torch.Generator().manual_seed(4)
    return {
        "images": torch.rand(b, 3, 16 * h, 16 * w, generator=g) * 2 - 1,
        "controls": torch.rand(b, 3, 16 * h, 16 * w, generator=g) * 2 - 1,
        "captions": ["hello", "world", "again"][:b],
        "schedule": SCHEDULE,
        "valid": torch.ones(b, dtype=torch.bool),
    }


def test_panel_callback_on_fake_objects_saves_logs_and_restores_train_mode(tmp_path):
    module = FakePilotModule().train()
    module.model.block_list[0].eval()  # a submodule deliberately in eval mode (like a frozen base) must stay so
    modes = {name: m.training for name, m in module.named_modules()}
    wandb_logger = FakeWandb()
    trainer = SimpleNamespace(global_step=0, loggers=[wandb_logger], default_root_dir=str(tmp_path))
    cb = SamplePanelCallback(every_n_steps=2, num_samples=2, cfg=2.0, top_p=0.9)
    batch = fake_batch()
    for i in range(3):
        cb.on_train_batch_start(trainer, module, batch, i)
        trainer.global_step += 1
        cb.on_train_batch_end(trainer, module, None, batch, i)
    assert cb.samples["captions"] == ["hello", "world"]
    first = tmp_path / "panels" / "step_000002.png"
    assert first.exists() and {name: m.training for name, m in module.named_modules()} == modes
    cb.on_train_end(trainer, module)  # step 3: one more panel
    last = tmp_path / "panels" / "step_000003.png"
    _, h, w = SCHEDULE[-1]
    with Image.open(last) as img:
        assert img.size == (4 * 16 * w + 5 * 4, 18 + 2 * (16 * h + 20) + 4)
    assert [(k, s) for k, _, s, _ in wandb_logger.images] == [("samples", 2), ("samples", 3)]
    assert all(len(imgs) == 1 and isinstance(imgs[0], Image.Image) for _, imgs, _, _ in wandb_logger.images)
    assert all(" | ".join(COLUMN_TITLES) in kw["caption"][0] for *_, kw in wandb_logger.images)
    # same seed, same weights: the panel is reproducible; the untrained residual pilot equals the base
    with_control, without_control = cb.generate(module)
    again, _ = cb.generate(module)
    assert torch.equal(with_control, again) and torch.equal(with_control, without_control)
    cb.on_train_end(trainer, module)  # nothing new at the same step
    assert len(wandb_logger.images) == 2


class ModeProbe(L.Callback):
    """Records every module's train/eval flag at each batch start and at the end of training."""

    def __init__(self) -> None:
        self.modes: list[dict[str, bool]] = []

    def _record(self, pl_module) -> None:
        self.modes.append({name: m.training for name, m in pl_module.named_modules()})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._record(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._record(pl_module)


def test_both_callbacks_in_a_real_lightning_run(tmp_path):
    from scenetxtvar.training.module import PilotModule

    module = PilotModule(
        model={"preset": "infinity_pilot_tiny"},
        vae={"kind": "bsq", "base_ch": 32, "ch_mult": [1, 1, 1, 1, 1], "num_res_blocks": 1, "patch_size": 16,
             "codebook_dim": 32},
        text={"kind": "tiny", "dim": 256},
        optim={"lr": 1e-2},
    )  # fmt: skip
    schedule = get_schedule(1.0, "0.06M")[:3]  # the first scales of the 256px schedule: 64x64 images, fast on CPU
    g = torch.Generator().manual_seed(0)
    batch = {
        "images": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1,
        "controls": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1,
        "captions": ["sale", "open 24h"],
        "schedule": schedule,
        "valid": torch.ones(2, dtype=torch.bool),
    }
    loader = torch.utils.data.DataLoader([batch, batch], batch_size=None)
    drift = ParameterDriftCallback(every_n_steps=1, fusion_every_n_steps=2)
    panels = SamplePanelCallback(every_n_steps=1, num_samples=1)
    probe = ModeProbe()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[drift, panels, probe],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    history = drift.visualizer.history
    assert sorted(history) == [1, 2]
    for step in (1, 2):
        assert history[step]["frozen/max_abs_change"] == 0 and history[step]["frozen/params_with_grad"] == 0
        assert history[step]["trainable/params_without_grad"] == 0 and history[step]["update/total"] > 0
    assert history[2]["fusion/mean"] > 0 and "fusion/j0/s2" in history[2]
    assert (tmp_path / "drift" / "drift.png").exists()
    assert sorted(p.name for p in (tmp_path / "panels").iterdir()) == ["step_000001.png", "step_000002.png"]
    with Image.open(tmp_path / "panels" / "step_000002.png") as img:
        assert img.size == (4 * 64 + 5 * 4, 18 + 64 + 20 + 4)
    # the callbacks' eval-mode forwards leave every module's mode as training had it (frozen base: eval)
    assert len(probe.modes) == 3 and probe.modes[0] == probe.modes[1] == probe.modes[2]
    assert not probe.modes[0]["model.block_chunks.0"] and probe.modes[0]["model.car_blocks.0"]
