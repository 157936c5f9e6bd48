"""The training application: config composition, a real tiny run, frozen base, resume, bad overrides."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF, FAST_RUN, ROOT, compose_config
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from scenetxtvar.models.pilot import is_car_key


def make_cfg(run_dir: Path, cache: Path, *overrides: str):
    return compose_config("train", run_dir, cache, *FAST_RUN, *overrides)


@pytest.mark.slow
def test_every_model_vae_schedule_strategy_combination_composes():
    models = [p.stem for p in (ROOT / "conf/model").glob("*.yaml")]
    vaes = [p.stem for p in (ROOT / "conf/vae").glob("*.yaml")]
    schedules = [p.stem for p in (ROOT / "conf/schedule").glob("*.yaml")]
    strategies = [p.stem for p in (ROOT / "conf/strategy").glob("*.yaml")]
    assert {"tiny", "layer16", "2b", "8b", "20b"} <= set(models) and {"bsq", "vq"} <= set(vaes)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for model, vae, schedule, strategy in itertools.product(models, vaes, schedules, strategies):
            cfg = compose(
                "train",
                overrides=[
                    f"model={model}",
                    f"vae={vae}",
                    f"schedule={schedule}",
                    f"strategy={strategy}",
                    "paths.run_dir=/tmp/x",
                ],
            )
            resolved = OmegaConf.to_container(cfg, resolve=True)
            assert resolved["model"]["build"]["preset"].startswith("infinity_pilot_")
            assert resolved["vae"]["build"]["kind"] in ("bsq", "vq")
            if model not in ("tiny", "demo"):  # real models read their weights and use Flan-T5 on GPUs
                assert resolved["model"]["build"]["base_weights"] and resolved["text"]["kind"] == "t5"
                assert resolved["trainer"]["precision"] == "bf16-mixed"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache_dir):
    from scenetxtvar.training.run import run

    run_dir = tmp_path_factory.mktemp("run")
    cfg = make_cfg(
        run_dir,
        cache_dir,
        "trainer.max_steps=5",
        "callbacks.checkpoint.every_n_train_steps=5",
        "text.cache_prompts=64",
        "vae.cache_samples=64",
    )
    return cfg, run(cfg)


def test_tiny_run_writes_lightning_checkpoints_and_a_car_export(tiny_run):
    cfg, result = tiny_run
    run_dir = Path(result["run_dir"])
    assert result["global_step"] == 5
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 5 and ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    assert set(ckpt["state_dict"]) and all(is_car_key(k.removeprefix("model.")) for k in ckpt["state_dict"])
    assert "rng" in ckpt["scenetxtvar"] and ckpt["scenetxtvar"]["base_fingerprint"].numel() > 0
    car = load_file(run_dir / "export" / "car_weights.safetensors")
    assert car and all(is_car_key(k) for k in car)
    assert (run_dir / "export" / "car_config.json").exists()
    header, *rows = (run_dir / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    assert "train/loss" in header.split(",") and "perf/tokens_per_s" in header.split(",") and rows
    # text.cache_prompts and vae.cache_samples are on in this run: each cache's hit rate is logged, a share
    for name in ("text", "feature"):
        column = header.split(",").index(f"perf/{name}_cache_hit_rate")
        rates = [float(v) for row in rows if (v := row.split(",")[column])]
        assert rates and all(0.0 <= r <= 1.0 for r in rates)


def test_training_changes_only_the_car_branch(tiny_run, tmp_path):
    from scenetxtvar.checkpoint import load_car_weights
    from scenetxtvar.training.module import PilotModule

    cfg, result = tiny_run

    def fresh():
        return PilotModule(
            model=OmegaConf.to_container(cfg.model.build, resolve=True),
            vae=OmegaConf.to_container(cfg.vae.build, resolve=True),
            text=OmegaConf.to_container(cfg.text, resolve=True),
            conditions=list(cfg.condition.names),
        )

    before, after = fresh(), fresh()
    load_car_weights(after.model, Path(result["export_dir"]) / "car_weights.safetensors")
    sd0, sd1 = before.model.state_dict(), after.model.state_dict()
    frozen = [k for k in sd0 if not is_car_key(k)]
    assert frozen and all(torch.equal(sd0[k], sd1[k]) for k in frozen)
    assert any(not torch.equal(sd0[k], sd1[k]) for k in sd0 if is_car_key(k))
    trainable = {n for n, p in after.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in after.model.named_parameters() if is_car_key(n)}


def test_resume_equals_an_uninterrupted_run(tmp_path, cache_dir):
    from scenetxtvar.training.run import run

    # 3 steps per epoch: the resume at step 2 is mid-epoch (the RNG must survive the new loader iterator).
    common = [
        "data.epoch_samples=6",
        "data.num_train=8",
        "callbacks.checkpoint.every_n_train_steps=2",
        "control_dropout=0.5",
        "trainer.check_val_every_n_epoch=100",
    ]
    full = run(make_cfg(tmp_path / "full", cache_dir, "trainer.max_steps=4", *common))
    first = run(make_cfg(tmp_path / "part", cache_dir, "trainer.max_steps=2", *common))
    resumed = run(
        make_cfg(
            tmp_path / "part",
            cache_dir,
            "trainer.max_steps=4",
            *common,
            f"ckpt_path={first['checkpoint_dir']}/last.ckpt",
        )
    )
    assert resumed["global_step"] == full["global_step"] == 4
    a = load_file(Path(full["export_dir"]) / "car_weights.safetensors")
    b = load_file(Path(resumed["export_dir"]) / "car_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "override,error",
    [
        ("model.build.car_depth=3", "car_depth=3 must be between 1 and depth // 2 = 2"),
        ("model.build.base_weights=/nowhere/infinity.pth", "model.build.base_weights|model.base_weights"),
        ("condition.names=[glyph,sparkles]", "unknown condition"),
        ("global_batch_size=3", "not divisible by the 2 devices"),
    ],
)
def test_nonsense_overrides_fail_before_training(tmp_path, cache_dir, override, error):
    from scenetxtvar.training.run import run

    extra = ["trainer.devices=2", "trainer.accelerator=cpu"] if "global_batch" in override else []
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        run(make_cfg(tmp_path / "bad", cache_dir, override, *extra))
    assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.slow
def test_train_py_command_line(tmp_path):
    """`python train.py hydra.run.dir=DIR trainer.max_steps=N` leaves both checkpoint kinds."""
    cmd = [
        sys.executable,
        "train.py",
        f"hydra.run.dir={tmp_path}/run",
        f"paths.cache_dir={tmp_path}/cache",
        "trainer.max_steps=3",
        "debug=fast",
        "callbacks=minimal",
        "logger=csv",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "run" / "export" / "car_weights.safetensors").exists()


@pytest.mark.slow
def test_multirun_makes_two_runs_with_drift_metrics_in_offline_wandb_files(tmp_path):
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "optim.lr=1e-4,2e-4",
        f"hydra.sweep.dir={tmp_path}/sweep",
        f"paths.cache_dir={tmp_path}/cache",
        "debug=fast",
        "logger=wandb",
        "callbacks.drift.every_n_steps=1",
        "callbacks.panels.every_n_steps=100",
        "trainer.max_steps=3",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in runs] == ["0", "1"]
    for run in runs:
        records = list(run.glob("wandb/offline-run-*/run-*.wandb"))
        assert len(records) == 1, list(run.rglob("*"))
        data = records[0].read_bytes()  # wandb's binary record log: the metric keys are stored verbatim
        for key in (b"drift/rel/total", b"drift/abs/car_skip_linear.0", b"frozen/max_abs_change", b"train/loss"):
            assert key in data, key
        assert (run / "export" / "car_weights.safetensors").exists()


def test_slurm_launcher_and_sweep_configs_compose():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["launcher=slurm", "model=2b", "vae=bsq", "strategy=fsdp", "paths.run_dir=/tmp/x"],
            return_hydra_config=True,
        )
        assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.trainer.devices == 8
        sweep = compose("train", overrides=["hparams_search=basic", "paths.run_dir=/tmp/x"], return_hydra_config=True)
        assert set(sweep.hydra.sweeper.params) == {
            "optim.lr",
            "model.build.car_depth",
            "model.build.fusion",
            "control_dropout",
        }


def tiny_pilot_batch() -> dict:
    """Two 64x64 samples with random glyph strokes on the tiny 3-scale schedule."""
    gen = torch.Generator().manual_seed(1)
    return {
        "images": torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1,
        "controls": (torch.rand(2, 3, 64, 64, generator=gen) > 0.8) * 2.0 - 1,
        "captions": ['a sign that says "OPEN"', 'a sign that says "CAFE"'],
        "schedule": [[1, 1, 1], [1, 2, 2], [1, 4, 4]],
    }


def tiny_pilot_module(cfg, **kwargs):
    """A seeded PilotModule of the tiny run's config (``kwargs``: further constructor arguments)."""
    from scenetxtvar.training.module import PilotModule

    torch.manual_seed(0)
    return PilotModule(
        model=OmegaConf.to_container(cfg.model.build, resolve=True),
        vae=OmegaConf.to_container(cfg.vae.build, resolve=True),
        text=OmegaConf.to_container(cfg.text, resolve=True),
        conditions=list(cfg.condition.names),
        **kwargs,
    )


def test_conv_precision_bf16_runs_the_stem_and_encoder_in_bf16_only(tiny_run):
    """conv_precision=bf16: the control stem and the tokenizer's encode under bf16 autocast; the transformer,
    the loss and the trainable weights' gradients stay fp32, and the loss stays near the fp32 one."""
    cfg, _ = tiny_run
    batch = tiny_pilot_batch()
    losses = {}
    for precision in ("fp32", "bf16"):
        module = tiny_pilot_module(cfg, conv_precision=precision)
        seen: dict[str, set] = {"stem": set(), "vae": set(), "block": set()}
        for name, part in (
            ("stem", module.model.car_control_convs.conv_out),
            ("vae", module.vae.encoder),
            ("block", module.model.block_list[0]),
        ):
            part.register_forward_hook(lambda m, i, o, dtypes=seen[name]: dtypes.add(o.dtype))
        stats = module.compute_loss(batch, noise=False, drop_control=False)
        stats["loss"].backward()
        losses[precision] = stats["loss"].item()
        expected = torch.bfloat16 if precision == "bf16" else torch.float32
        assert seen["stem"] == seen["vae"] == {expected}
        assert seen["block"] == {torch.float32} and stats["loss"].dtype == torch.float32
        grads = [p.grad for p in module.model.car_control_convs.parameters()]
        assert all(g is not None and g.dtype == torch.float32 and g.isfinite().all() for g in grads)
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


def test_feature_cache_serves_seen_samples_without_the_encoder_and_changes_no_loss(tiny_run):
    """vae.cache_samples: the second pass over the same (named) samples skips the tokenizer's encoder, and the
    loss is the uncached one."""
    cfg, _ = tiny_run
    batch = {**tiny_pilot_batch(), "meta": [{"key": "s0", "url": "shard-0.tar"}, {"key": "s1", "url": "shard-0.tar"}]}
    # eval: no random prompt drop
    plain, cached = tiny_pilot_module(cfg, feature_cache=0).eval(), tiny_pilot_module(cfg, feature_cache=8).eval()
    assert plain.feature_cache is None
    calls = []
    cached.vae.encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    want = plain.compute_loss(batch, noise=False, drop_control=False)["loss"]
    for _ in range(2):
        got = cached.compute_loss(batch, noise=False, drop_control=False)["loss"]
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert calls == [2] and (cached.feature_cache.hits, cached.feature_cache.misses) == (2, 2)


def test_conv_precision_resolves_auto_and_refuses_unknown_values(monkeypatch, tiny_run):
    from scenetxtvar.training import run as run_module
    from scenetxtvar.training.module import PilotModule

    monkeypatch.setattr(run_module.torch.cuda, "is_available", lambda: False)
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(run_module, "cpu_has_fast_bf16", lambda native=native: native)
        assert run_module.resolve_conv_precision("auto") == expected
    assert run_module.resolve_conv_precision("fp32") == "fp32"
    with pytest.raises(ValueError, match="conv_precision must be fp32, bf16 or auto"):
        run_module.resolve_conv_precision("fp16")
    cfg, _ = tiny_run
    with pytest.raises(ValueError, match="conv_precision must be one of"):
        PilotModule(
            model=OmegaConf.to_container(cfg.model.build, resolve=True),
            vae=OmegaConf.to_container(cfg.vae.build, resolve=True),
            text=OmegaConf.to_container(cfg.text, resolve=True),
            conditions=list(cfg.condition.names),
            conv_precision="auto",
        )


def test_glyph_token_weights_favour_stroke_tokens_and_keep_each_scale_total():
    from scenetxtvar.training.module import glyph_token_weights

    sched = [(1, 1), (1, 2), (2, 4), (4, 8)]
    mask = torch.zeros(2, 1, 32, 64)
    mask[0, :, 8:16, 16:48] = 1  # one text line in sample 0 (grid row 1, columns 2-5 at 4x8); none in sample 1
    w = glyph_token_weights(mask, sched, 4.0)
    assert w.shape == (2, 1 + 2 + 8 + 32)
    start = 0
    for h, wd in sched:
        assert torch.allclose(w[:, start : start + h * wd].mean(1), torch.ones(2))
        start += h * wd
    last = w[0, 11:].view(4, 8)
    assert (last[1, 2:6] > 1).all() and (last[0] < 1).all() and (last[1, 2:6] == last[1, 2]).all()
    assert torch.equal(w[1], torch.ones(43))  # no text: every token counts the same
    assert torch.equal(glyph_token_weights(mask, sched, 0.0), torch.ones(2, 43))


def test_glyph_weighted_loss_changes_the_loss_only_where_there_is_text(tiny_run):
    """loss.glyph_weight > 0: the same batch and weights give another (finite, differentiable) loss; a batch
    without glyph strokes gives exactly the official per-scale loss (every token of a scale weighs the same)."""
    from scenetxtvar.training.module import PilotModule

    cfg, _ = tiny_run
    batch = tiny_pilot_batch()
    blank = {**batch, "controls": -torch.ones_like(batch["controls"])}
    losses, blank_losses = {}, {}
    for weight in (0.0, 4.0):
        torch.manual_seed(0)
        module = PilotModule(
            model=OmegaConf.to_container(cfg.model.build, resolve=True),
            vae=OmegaConf.to_container(cfg.vae.build, resolve=True),
            text=OmegaConf.to_container(cfg.text, resolve=True),
            conditions=list(cfg.condition.names),
            loss={"glyph_weight": weight},
        )
        stats = module.compute_loss(batch, noise=False, drop_control=False)
        stats["loss"].backward()
        losses[weight] = stats["loss"].item()
        assert all(p.grad is not None and p.grad.isfinite().all() for p in module.model.car_control_convs.parameters())
        blank_losses[weight] = module.compute_loss(blank, noise=False, drop_control=False)["loss"].item()
    assert losses[4.0] != pytest.approx(losses[0.0], rel=1e-6)
    assert blank_losses[4.0] == pytest.approx(blank_losses[0.0], rel=1e-6)

    # A glyph weight needs the glyph condition to weigh by, and a negative one makes no sense: both refused.
    for conditions, weight in ((["normal"], 4.0), (list(cfg.condition.names), -1.0)):
        with pytest.raises(ValueError, match="loss.glyph_weight"):
            PilotModule(
                model=OmegaConf.to_container(cfg.model.build, resolve=True),
                vae=OmegaConf.to_container(cfg.vae.build, resolve=True),
                text=OmegaConf.to_container(cfg.text, resolve=True),
                conditions=conditions,
                loss={"glyph_weight": weight},
            )


@pytest.mark.parametrize(
    ("precision", "clip", "expected"),
    [("32-true", 5.0, {"fused": True}), ("bf16-mixed", None, {"fused": True}), ("bf16-mixed", 5.0, {"foreach": True})],
)
def test_adamw_kernel_is_fused_unless_lightning_refuses_it(precision, clip, expected):
    """Fused AdamW everywhere it may run: Lightning's mixed-precision plugin refuses to clip gradients for a
    fused optimizer, so clipped mixed-precision runs take the multi-tensor path (and still clip)."""
    import lightning as L

    from scenetxtvar.training.module import adamw_kernel

    trainer = L.Trainer(accelerator="cpu", precision=precision, gradient_clip_val=clip, logger=False)
    assert adamw_kernel(trainer, torch.device("cpu")) == expected
    assert adamw_kernel(None, torch.device("cpu")) == {"fused": True}
    assert adamw_kernel(None, torch.device("meta")) == {}
