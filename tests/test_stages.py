"""The three training stages through run(cfg): tokenizer -> base -> car via the public loaders, and wrong inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST_RUN, compose_config
from PIL import Image
from safetensors.torch import load_file

# The demo's 64x128 / patch-8 / 5-scale setup at a few steps, single words.
DEMO = [
    "model=demo",
    "vae=bsq_demo",
    "schedule=demo64x128",
    "data.size=64x128",
    "data.min_words=1",
    "data.max_words=1",
    "trainer.max_steps=2",
    "callbacks.checkpoint.every_n_train_steps=2",
]


def make_cfg(run_dir: Path, cache: Path, *overrides: str):
    return compose_config("train", run_dir, cache, *FAST_RUN, *DEMO, *overrides)


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory, cache_dir):
    from scenetxtvar.training.run import run

    return run(make_cfg(tmp_path_factory.mktemp("tok"), cache_dir, "stage=tokenizer", "trainer.val_check_interval=2"))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, cache_dir, tokenizer_run):
    from scenetxtvar.training.run import run

    tok = Path(tokenizer_run["export_dir"]) / "tokenizer.safetensors"
    return run(make_cfg(tmp_path_factory.mktemp("base"), cache_dir, "stage=base", f"vae.build.path={tok}"))


def test_tokenizer_stage_trains_and_exports_what_load_bsq_vae_reads(tokenizer_run):
    from scenetxtvar.tokenizers import load_bsq_vae

    assert tokenizer_run["stage"] == "tokenizer" and tokenizer_run["global_step"] == 2
    export = Path(tokenizer_run["export_dir"])
    vae = load_bsq_vae(export / "tokenizer.safetensors")
    config = json.loads((export / "tokenizer_config.json").read_text())
    assert (vae.patch_size, vae.code_dim, vae.config.base_ch) == (8, 48, 16)
    assert (config["patch_size"], config["codebook_dim"], config["base_ch"]) == (8, 48, 16)
    assert list(vae.config.ch_mult) == config["ch_mult"] == [1, 2, 2]
    assert vae.config.pixel_unshuffle == config["pixel_unshuffle"] == 2
    assert vae.config.norm_groups == config["norm_groups"] == 0  # vae=bsq_demo is norm-free
    # Trained: the weights differ from the seeded random tokenizer of the same config.
    from scenetxtvar.training.builders import build_tokenizer

    arch = dict(
        base_ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, patch_size=8, codebook_dim=48, norm_groups=0, pixel_unshuffle=2
    )
    random = build_tokenizer(kind="bsq", seed=0, **arch)
    trained, init = vae.state_dict(), random.state_dict()
    # Same architecture first: torch.equal of tensors of different shapes is False, which would pass vacuously.
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in init.items()}
    assert any(not torch.equal(trained[k], init[k]) for k in init if init[k].is_floating_point())
    header, *rows = (Path(tokenizer_run["run_dir"]) / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    assert {"train/loss", "train/l1", "train/glyph_l1", "train/commit"} <= set(header.split(",")) and rows
    # Validation draws originals beside their reconstructions.
    panels = sorted((Path(tokenizer_run["run_dir"]) / "panels").glob("reconstructions_step*.png"))
    assert panels
    with Image.open(panels[-1]) as im:
        assert im.width > 2 * 128
    with torch.no_grad():  # it tokenizes a 64x128 image over the demo schedule
        z, bits = vae.encode(torch.zeros(1, 3, 64, 128), [(1, 1), (1, 2), (2, 4), (4, 8), (8, 16)])
    assert z.shape == (1, 48, 8, 16) and bits[-1].shape == (1, 1, 8, 16, 48)


def test_base_stage_trains_infinity_and_exports_what_load_infinity_reads(base_run):
    from scenetxtvar.checkpoint import load_infinity
    from scenetxtvar.models.pilot import is_car_key

    assert base_run["stage"] == "base" and base_run["global_step"] == 2
    path = Path(base_run["export_dir"]) / "base.safetensors"
    sd = load_file(path)
    assert sd and not any(is_car_key(k) for k in sd)
    model = load_infinity(path)
    assert (model.depth, model.C, model.codebook_dim, model.text_channels) == (4, 128, 48, 256)
    assert 1.0e6 < sum(p.numel() for p in model.parameters()) < 1.3e6
    ckpt = torch.load(Path(base_run["checkpoint_dir"]) / "last.ckpt", map_location="cpu", weights_only=True)
    assert all(torch.equal(ckpt["state_dict"][f"model.{k}"], v) for k, v in sd.items())


def test_car_stage_runs_on_the_trained_base_and_tokenizer(tmp_path, cache_dir, tokenizer_run, base_run):
    from scenetxtvar.checkpoint import load_car_weights
    from scenetxtvar.training.builders import build_pilot

    tok = Path(tokenizer_run["export_dir"]) / "tokenizer.safetensors"
    base = Path(base_run["export_dir"]) / "base.safetensors"
    from scenetxtvar.training.run import run

    # conv_precision=bf16 as the demo profiles run it (auto on this CPU): control stem and encode in bf16.
    overrides = (f"vae.build.path={tok}", f"model.build.base_weights={base}", "conv_precision=bf16")
    cfg = make_cfg(tmp_path, cache_dir, *overrides)
    result = run(cfg)
    assert result["stage"] == "car" and result["global_step"] == 2
    keys = ("car_depth", "control_channels", "control_unshuffle", "token_conv_kernel")  # model=demo's branch
    pilot = build_pilot("infinity_pilot_tiny", base_weights=str(base), **{k: cfg.model.build[k] for k in keys})
    assert pilot.control_patch == 8
    load_car_weights(pilot, Path(result["export_dir"]) / "car_weights.safetensors")
    # The base inside the pilot is the base stage's export, untouched by the CAR stage.
    base_sd = load_file(base)
    assert all(torch.equal(pilot.state_dict()[k], v) for k, v in base_sd.items())


def test_car_stage_with_an_ema_exports_the_averaged_weights(tmp_path, cache_dir, tokenizer_run, base_run):
    """`make demo`'s CAR stage averages its weights (Lightning's EMAWeightAveraging through training/ema.py): the
    export evaluate.py reads is the average the checkpoint holds, not the raw weights of the last step."""
    from scenetxtvar.training.run import run

    tok = Path(tokenizer_run["export_dir"]) / "tokenizer.safetensors"
    base = Path(base_run["export_dir"]) / "base.safetensors"
    cfg = make_cfg(
        tmp_path,
        cache_dir,
        f"vae.build.path={tok}",
        f"model.build.base_weights={base}",
        "+callbacks.ema._target_=scenetxtvar.training.ema.EMA",
        "+callbacks.ema.decay=0.5",
    )
    result = run(cfg)
    exported = load_file(Path(result["export_dir"]) / "car_weights.safetensors")
    ckpt = torch.load(next(Path(result["checkpoint_dir"]).glob("*step=2.ckpt")), map_location="cpu", weights_only=True)
    average = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    raw = {k.removeprefix("model."): v for k, v in ckpt["current_model_state"].items()}
    assert set(exported) == set(average)
    assert all(torch.equal(exported[k], average[k]) for k in exported)
    assert any(not torch.equal(exported[k], raw[k]) for k in exported)


def test_ema_pickles_for_spawned_workers_and_averages_like_lightnings() -> None:
    """Spawned DDP ranks get the callbacks pickled; Lightning's own EMA holds a closure and cannot go."""
    import pickle

    from lightning.pytorch.callbacks import EMAWeightAveraging
    from torch.optim.swa_utils import get_ema_avg_fn

    from scenetxtvar.training.ema import EMA

    with pytest.raises((AttributeError, pickle.PicklingError)):
        pickle.dumps(EMAWeightAveraging(decay=0.9))
    ema = pickle.loads(pickle.dumps(EMA(decay=0.9, update_starting_at_step=3)))
    assert ema.update_starting_at_step == 3 and not ema.should_update(step_idx=2) and ema.should_update(step_idx=3)
    average, current = torch.randn(5), torch.randn(5)
    expected = get_ema_avg_fn(0.9)(average, current, torch.tensor(1))
    torch.testing.assert_close(ema._kwargs["avg_fn"](average, current, torch.tensor(1)), expected)
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.5)


def _bad_tokenizer(path: Path) -> Path:
    from scenetxtvar.tokenizers import BSQVAE, BSQVAEConfig
    from scenetxtvar.training.tokenizer_stage import export_tokenizer

    vae = BSQVAE(
        BSQVAEConfig(
            base_ch=16,
            ch_mult=(1, 2, 2),
            num_res_blocks=1,
            patch_size=8,
            codebook_dim=8,
            norm_groups=0,
            pixel_unshuffle=2,
        )
    )
    return export_tokenizer(vae, path)


@pytest.mark.parametrize(
    "overrides,error",
    [
        (["model.build.base_weights=/nowhere/base.safetensors"], "model.build.base_weights"),
        (["stage=base", "vae.build.path=/nowhere/tokenizer.safetensors"], "vae.build.path"),
        (["stage=car", "vae.build.path=/nowhere/tokenizer.safetensors"], "vae.build.path"),
        (["stage=base", "vae.build.path=BAD"], "has codebook_dim=8, but vae.build sets codebook_dim=48"),
        (["vae.build.path=BAD"], "has codebook_dim=8, but vae.build sets codebook_dim=48"),
        (["stage=base", "vae.build.path=BAD", "~vae.build.codebook_dim"], "codebook_dim=8, the transformer expects 48"),
        (["vae.build.path=BAD", "~vae.build.codebook_dim"], "codebook_dim=8, the transformer expects 48"),
        (["stage=sideways"], "stage must be one of"),
    ],
)
def test_a_stage_on_the_wrong_input_fails_before_training(tmp_path, cache_dir, overrides, error):
    from scenetxtvar.training.run import run

    if any(o.endswith("=BAD") for o in overrides):
        bad = _bad_tokenizer(tmp_path)
        overrides = [o.replace("BAD", str(bad)) for o in overrides]
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        run(make_cfg(tmp_path / "run", cache_dir, *overrides))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_custom_schedule_is_used_when_the_batch_has_none():
    from scenetxtvar.training.module import batch_schedule

    scales = [[1, 1], [1, 2], [2, 4], [4, 8], [8, 16]]
    assert batch_schedule({"schedule": None}, scales)[-1] == (1, 8, 16)
    assert batch_schedule({"schedule": [(1, 1, 1), (1, 2, 2)]}, scales) == [(1, 1, 1), (1, 2, 2)]
    with pytest.raises(ValueError, match="schedule.scales"):
        batch_schedule({"schedule": None})


@pytest.mark.parametrize("stage", ["tokenizer", "base"])
def test_stage_resume_equals_an_uninterrupted_run(tmp_path, cache_dir, tokenizer_run, stage):
    """2 steps + resume to 4 exports the same weights, bit for bit, as 4 steps in one go."""
    from scenetxtvar.training.run import run

    weights = {"tokenizer": "tokenizer.safetensors", "base": "base.safetensors"}[stage]
    tok = Path(tokenizer_run["export_dir"]) / "tokenizer.safetensors"
    common = [
        f"stage={stage}",
        "data.epoch_samples=6",
        "data.num_train=8",
        "callbacks.checkpoint.every_n_train_steps=2",
        "trainer.check_val_every_n_epoch=100",
        *([f"vae.build.path={tok}"] if stage == "base" else []),
    ]
    full = run(make_cfg(tmp_path / "full", cache_dir, *common, "trainer.max_steps=4"))
    first = run(make_cfg(tmp_path / "part", cache_dir, *common, "trainer.max_steps=2"))
    half = load_file(Path(first["export_dir"]) / weights)
    ckpt = f"ckpt_path={first['checkpoint_dir']}/last.ckpt"
    resumed = run(make_cfg(tmp_path / "part", cache_dir, *common, "trainer.max_steps=4", ckpt))
    assert resumed["global_step"] == full["global_step"] == 4
    a = load_file(Path(full["export_dir"]) / weights)
    b = load_file(Path(resumed["export_dir"]) / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The resumed run trained on: its weights are not the 2-step ones the first part exported then.
    assert any(not torch.equal(a[k], half[k]) for k in a if a[k].is_floating_point())


def test_channels_last_tokenizer_loss_and_gradients_match_the_contiguous_ones():
    """channels-last is a memory layout only: same loss and same gradients as NCHW."""
    from scenetxtvar.training.tokenizer_stage import TokenizerModule

    vae = dict(kind="bsq", seed=0, base_ch=16, ch_mult=[1, 1, 2, 2], num_res_blocks=1, patch_size=8, codebook_dim=32)
    g = torch.Generator().manual_seed(0)
    batch = {
        "images": torch.rand(2, 3, 64, 128, generator=g) * 2 - 1,
        "controls": (torch.rand(2, 3, 64, 128, generator=g) > 0.9).float(),
        "captions": ["a", "b"],
    }
    sched, results = [(1, 1), (2, 4), (8, 16)], []
    for channels_last in (True, False):
        module = TokenizerModule({**vae, "norm_groups": 0}, schedule=sched, channels_last=channels_last)
        loss = module.compute_loss(batch)["loss"]
        loss.backward()
        results.append((loss.detach(), module.vae.encoder.conv_in.conv.weight.grad))
    (loss_cl, grad_cl), (loss_nchw, grad_nchw) = results
    assert torch.allclose(loss_cl, loss_nchw, atol=1e-5)
    assert torch.allclose(grad_cl, grad_nchw, atol=1e-5, rtol=1e-4)


def test_tokenizer_stage_trains_under_bf16_autocast(tmp_path, cache_dir):
    """trainer.precision=bf16-mixed (what auto-bf16 picks on a CPU with native bf16) trains and exports fp32."""
    from scenetxtvar.tokenizers import load_bsq_vae
    from scenetxtvar.training.run import run

    result = run(make_cfg(tmp_path, cache_dir, "stage=tokenizer", "trainer.precision=bf16-mixed"))
    weights = load_file(Path(result["export_dir"]) / "tokenizer.safetensors")
    floats = [v for v in weights.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 and v.isfinite().all() for v in floats)
    assert load_bsq_vae(Path(result["export_dir"]) / "tokenizer.safetensors").patch_size == 8


def test_precision_auto_bf16_follows_the_hardware(monkeypatch):
    from scenetxtvar.training import run as run_module

    monkeypatch.setattr(run_module.torch.cuda, "is_available", lambda: False)
    for native, expected in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(run_module, "cpu_has_fast_bf16", lambda native=native: native)
        assert run_module.resolve_precision("auto-bf16") == expected
        assert run_module.resolve_precision("auto") == "32-true"  # a small transformer gains nothing on CPU
    assert run_module.resolve_precision("16-mixed") == "16-mixed"
    monkeypatch.setattr(run_module.torch.cuda, "is_available", lambda: True)
    assert run_module.resolve_precision("auto-bf16") == run_module.resolve_precision("auto") == "bf16-mixed"


def test_fast_bf16_means_bf16_instructions_not_emulation(monkeypatch):
    """oneDNN emulates bf16 on plain AVX-512 (slower than fp32 there): only AMX or AVX512-BF16 count."""
    from scenetxtvar.training import run as run_module

    for amx, avx512_bf16, expected in ((True, False, True), (False, True, True), (False, False, False)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        assert run_module.cpu_has_fast_bf16() is expected


def _tokenizer_batch(n: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "images": torch.rand(n, 3, 64, 128, generator=g) * 2 - 1,
        "controls": (torch.rand(n, 3, 64, 128, generator=g) > 0.9).float(),
        "captions": ["w"] * n,
    }


def _grads(params) -> list[bool]:
    return [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params]


def test_adversarial_terms_reach_only_their_own_player():
    """One backward, two players: the critic's hinge loss moves only the critic, the generator's only the tokenizer."""
    from scenetxtvar.training.tokenizer_stage import TokenizerModule

    vae = dict(kind="bsq", seed=0, base_ch=16, ch_mult=[1, 1, 2, 2], num_res_blocks=1, patch_size=8, codebook_dim=32)
    module = TokenizerModule({**vae, "norm_groups": 0}, schedule=[(1, 1), (2, 4), (8, 16)], adversarial={"weight": 0.5})
    stats = module.compute_loss(_tokenizer_batch())
    assert {"critic", "adversarial", "adv_weight"} <= stats.keys() and float(stats["adv_weight"]) > 0
    stats["critic"].backward(retain_graph=True)
    # (Weights only: at step 0 the hinge's two terms cancel in the last bias's gradient.)
    critic_weights = [p for p in module.discriminator.parameters() if p.ndim > 1]
    assert all(_grads(critic_weights)) and not any(_grads(module.vae.parameters()))
    module.zero_grad()
    stats["adversarial"].backward(retain_graph=True)
    assert not any(_grads(module.discriminator.parameters())) and any(_grads(module.vae.decoder.parameters()))
    # Corrupt samples (valid=False) stay out of the game: with none valid there is no adversarial term.
    corrupt = {**_tokenizer_batch(), "valid": torch.tensor([False, False])}
    assert "critic" not in module.compute_loss(corrupt)
    # Off by default: no critic, no terms.
    plain = TokenizerModule({**vae, "norm_groups": 0}, schedule=[(1, 1), (2, 4), (8, 16)])
    assert plain.discriminator is None and "critic" not in plain.compute_loss(_tokenizer_batch())


def test_adaptive_weight_balances_the_gradient_norms_at_the_decoder_output():
    """weight x |d rec / d w_last| / |d gen / d w_last|: scaling the reconstruction loss scales the weight."""
    from scenetxtvar.training.tokenizer_stage import TokenizerModule

    vae = dict(kind="bsq", seed=0, base_ch=16, ch_mult=[1, 1, 2, 2], num_res_blocks=1, patch_size=8, codebook_dim=32)
    module = TokenizerModule({**vae, "norm_groups": 0}, schedule=[(8, 16)], adversarial={"weight": 1.0})
    images = _tokenizer_batch()["images"]
    recon = module.vae.decoder(module.vae.encode_for_raw_features(images))
    rec = (recon - images).abs().mean()
    gen = -module.discriminator(recon).mean()
    w = module.adaptive_weight(rec, gen)
    assert w > 0 and module.adaptive_weight(3 * rec, gen) == pytest.approx(3 * w, rel=1e-4)


def test_tokenizer_stage_with_the_adversarial_term_exports_only_the_tokenizer(tmp_path, cache_dir):
    """The critic trains with the tokenizer (same optimizer) but stays out of tokenizer.safetensors."""
    from scenetxtvar.tokenizers import load_bsq_vae
    from scenetxtvar.training.run import run

    result = run(
        make_cfg(
            tmp_path,
            cache_dir,
            "stage=tokenizer",
            "tokenizer_stage.adversarial.weight=0.5",
            "tokenizer_stage.adversarial.start_step=1",
        )
    )
    assert {"train/critic", "train/adversarial"} <= result["metrics"].keys()
    weights = load_file(Path(result["export_dir"]) / "tokenizer.safetensors")
    assert not any("discriminator" in k for k in weights)
    assert load_bsq_vae(Path(result["export_dir"]) / "tokenizer.safetensors").patch_size == 8


def test_edge_term_sees_blurred_strokes_that_plain_l1_forgives():
    """edge_l1 is zero for a perfect copy and for a brightness shift, positive for a blurred edge; the stage adds
    it (with its own statistic) only when tokenizer_stage.loss.edge_weight > 0."""
    from scenetxtvar.training.tokenizer_stage import TokenizerModule, edge_l1

    sharp = -torch.ones(1, 3, 8, 8)
    sharp[..., :, 4:] = 1.0  # one vertical stroke edge
    assert float(edge_l1(sharp, sharp).abs().max()) == 0.0
    assert float(edge_l1(sharp + 0.3, sharp).abs().max()) < 1e-6  # a flat offset has no edges
    blurred = torch.nn.functional.avg_pool2d(sharp, 3, stride=1, padding=1, count_include_pad=False)
    assert edge_l1(blurred, sharp).shape == (1, 1, 8, 8) and float(edge_l1(blurred, sharp).sum()) > 0

    vae = dict(kind="bsq", seed=0, base_ch=16, ch_mult=[1, 1, 2, 2], num_res_blocks=1, patch_size=8, codebook_dim=32)
    sched = [(1, 1), (2, 4), (8, 16)]
    plain = TokenizerModule({**vae, "norm_groups": 0}, schedule=sched).compute_loss(_tokenizer_batch())
    module = TokenizerModule({**vae, "norm_groups": 0}, schedule=sched, loss={"edge_weight": 0.5})
    stats = module.compute_loss(_tokenizer_batch())
    assert "edge_l1" not in plain and float(stats["edge_l1"]) > 0
    assert torch.allclose(stats["loss"], plain["loss"] + 0.5 * stats["edge_l1"], atol=1e-5)
