"""InfinityPilot: identity at init, train == inference, frozen base, control use, weights, bad input."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import FIXTURES, load_fixture

import scenetxtvar.models.registry  # noqa: F401
from scenetxtvar.bitwise import BitwiseCodes, CodeAccumulator, bits_to_codes, build_targets
from scenetxtvar.checkpoint import (
    CheckpointMismatchError,
    load_car_weights,
    load_infinity,
    load_separated_weights,
    normalise_car_keys,
    save_separated_weights,
    save_state_dict,
)
from scenetxtvar.models.pilot import InfinityPilot, build_control_pyramid
from scenetxtvar.scales import get_schedule
from scenetxtvar.text import as_packed_text

SMALL = dict(
    depth=4,
    embed_dim=64,
    num_heads=4,
    text_channels=128,
    text_maxlen=12,
    codebook_dim=8,
    block_chunks=2,
    cond_drop_rate=0.0,
    control_channels=(8, 16, 32, 32, 32),
)


def make_pilot(**kw) -> InfinityPilot:
    torch.manual_seed(0)
    cfg = {**SMALL, "car_depth": 2, **kw}
    pilot = InfinityPilot(**cfg)
    pilot.init_weights(aln=1.0, aln_gamma=1.0, head_scale=1.0, seed=1)  # an O(1) base so every block matters
    return pilot.eval()


def randomise_branch(pilot: InfinityPilot) -> None:
    """Give the fusion non-zero weights, as after training."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in pilot.car_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def text_batch(b: int, dim: int = 128):
    g = torch.Generator().manual_seed(2)
    lens = [3 + i for i in range(b)]
    return torch.randn(sum(lens), dim, generator=g), lens, None, None


def controls_for(schedule, b: int = 2, patch: int = 16):
    _, h, w = schedule[-1]
    g = torch.Generator().manual_seed(3)
    return build_control_pyramid(torch.rand(b, 3, patch * h, patch * w, generator=g) * 2 - 1, schedule, patch)


def base_of(pilot: InfinityPilot):
    return load_infinity({k: v for k, v in pilot.state_dict().items() if not k.startswith("car_")})


SCHEDULE = get_schedule(0.5, "0.06M")  # non-square: RoPE offsets matter


def teacher_inputs(features, schedule):
    return build_targets(features, schedule).x_BLC_wo_prefix


def test_untrained_residual_pilot_is_the_base_model():
    pilot = make_pilot()
    base = base_of(pilot)
    text = text_batch(2)
    _, h, w = SCHEDULE[-1]
    x = teacher_inputs(torch.randn(2, 8, h, w), SCHEDULE)
    ctrl = controls_for(SCHEDULE)
    with torch.no_grad():
        assert torch.equal(pilot(text, x, SCHEDULE, control_tensors=ctrl), base(text, x, SCHEDULE))
    kw = dict(scale_schedule=SCHEDULE, label_B_or_BLT=text, B=2, top_k=1, cfg_list=3.0)
    a = base.autoregressive_infer_cfg(**kw)
    b = pilot.autoregressive_infer_cfg(control_tensors=ctrl, control_cfg=2.0, **kw)
    assert all(torch.equal(u, v) for u, v in zip(a.scale_bits, b.scale_bits))


@pytest.mark.parametrize("fusion", ["residual", "replace"])
def test_teacher_forced_equals_kv_cached_sampling_with_control(fusion):
    pilot = make_pilot(fusion=fusion)
    randomise_branch(pilot)
    text = text_batch(2)
    ctrl = controls_for(SCHEDULE)
    free = pilot.autoregressive_infer_cfg(
        scale_schedule=SCHEDULE, label_B_or_BLT=text, B=2, g_seed=0, control_tensors=ctrl, return_logits=True
    )
    acc = CodeAccumulator(SCHEDULE, 2, 8)
    inputs = [acc.add(k, bits_to_codes(b.squeeze(1).permute(0, 3, 1, 2))) for k, b in enumerate(free.scale_bits)]
    with torch.no_grad():
        forced = pilot(text, torch.cat(inputs[:-1], 1), SCHEDULE, control_tensors=ctrl)
        uncontrolled = pilot(text, torch.cat(inputs[:-1], 1), SCHEDULE)
    torch.testing.assert_close(forced, torch.cat(free.scale_logits, 1), atol=1e-4, rtol=0)
    assert (forced - uncontrolled).abs().max() > 1e-3  # the control really changes the output


def test_control_dropout_rows_are_the_base_model_and_two_axis_guidance_mixes_three_branches():
    pilot = make_pilot()
    randomise_branch(pilot)
    base = base_of(pilot)
    text = text_batch(2)
    _, h, w = SCHEDULE[-1]
    x = teacher_inputs(torch.randn(2, 8, h, w), SCHEDULE)
    ctrl = controls_for(SCHEDULE)
    with torch.no_grad():
        out = pilot(text, x, SCHEDULE, control_tensors=ctrl, control_keep=torch.tensor([True, False]))
        ref = base(text, x, SCHEDULE)
    assert torch.equal(out[1], ref[1]) and not torch.allclose(out[0], ref[0])
    # Two-axis guidance equals the documented combination of the three teacher-forced branches.
    s_t, s_c = 3.0, 2.0
    res = pilot.autoregressive_infer_cfg(
        scale_schedule=SCHEDULE,
        label_B_or_BLT=text,
        B=2,
        g_seed=0,
        cfg_list=s_t,
        control_tensors=ctrl,
        control_cfg=s_c,
        return_logits=True,
    )
    acc = CodeAccumulator(SCHEDULE, 2, 8)
    inputs = [acc.add(k, bits_to_codes(b.squeeze(1).permute(0, 3, 1, 2))) for k, b in enumerate(res.scale_bits)]
    xi = torch.cat(inputs[:-1], 1)
    null = pilot.null_text_like(as_packed_text(text))
    with torch.no_grad():
        tc = pilot(text, xi, SCHEDULE, control_tensors=ctrl)
        c = pilot(null, xi, SCHEDULE, control_tensors=ctrl)
        u = pilot(null, xi, SCHEDULE)
    rows = torch.cat(res.scale_logits, 1)
    torch.testing.assert_close(rows[:2], tc, atol=1e-4, rtol=0)
    torch.testing.assert_close(rows[2:4], c, atol=1e-4, rtol=0)
    torch.testing.assert_close(rows[4:], u, atol=1e-4, rtol=0)


def test_only_the_control_branch_learns():
    pilot = make_pilot()
    pilot.train()
    frozen_before = {k: v.clone() for k, v in pilot.state_dict().items() if not k.startswith("car_")}
    assert all(not p.requires_grad for p in pilot.infinity_parameters())
    assert all(p.requires_grad for p in pilot.car_parameters())
    _, h, w = SCHEDULE[-1]
    t = pilot.code_space().targets(torch.randn(2, 8, h, w), SCHEDULE, noise_strength=0.3, noise_layers=7)
    opt = torch.optim.AdamW(pilot.car_parameters(), lr=1e-2)
    for _ in range(2):
        logits = pilot(text_batch(2), t.x_BLC_wo_prefix, SCHEDULE, control_tensors=controls_for(SCHEDULE))
        loss = pilot.code_space().loss_per_token(logits, t.labels).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with_grad = {n for n, p in pilot.named_parameters() if p.grad is not None}
    assert with_grad and all(n.startswith(("car_", "control_")) for n in with_grad)
    assert "car_skip_linear.0.weight" in with_grad and "car_blocks.0.sa.mat_qkv.weight" in with_grad
    after = pilot.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen_before.items())


@pytest.mark.slow
def test_the_control_is_actually_used_on_a_toy_task():
    """Targets are a function of the control only: with it the loss drops far below ln 2, without it not."""
    schedule = [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
    proj = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))

    def batch(g):
        grid = (torch.rand(8, 3, 4, 4, generator=g) * 2 - 1).sign()
        ctrl = grid.repeat_interleave(16, 2).repeat_interleave(16, 3)  # (8, 3, 64, 64)
        feats = torch.einsum("dc,bchw->bdhw", proj, grid)
        return build_control_pyramid(ctrl, schedule), BitwiseCodes(8).targets(feats, schedule)

    def run(use_control: bool) -> float:
        torch.manual_seed(0)
        pilot = InfinityPilot(**{**SMALL, "depth": 2, "block_chunks": 1, "car_depth": 1, "text_maxlen": 4})
        pilot.init_weights(aln=1.0, aln_gamma=1.0, head_scale=1.0, seed=0)
        pilot.train()
        opt = torch.optim.AdamW(pilot.car_parameters(), lr=3e-3)  # the same trainable set in both runs
        g = torch.Generator().manual_seed(1)
        text = (torch.zeros(8, 128), [1] * 8, None, None)
        for _ in range(150):
            ctrl, t = batch(g)
            ctrl = ctrl if use_control else [torch.zeros_like(c) for c in ctrl]
            loss = (
                pilot.code_space()
                .loss_per_token(pilot(text, t.x_BLC_wo_prefix, schedule, control_tensors=ctrl), t.labels)
                .mean()
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
        pilot.eval()
        ctrl, t = batch(torch.Generator().manual_seed(99))
        ctrl = ctrl if use_control else [torch.zeros_like(c) for c in ctrl]
        with torch.no_grad():
            logits = pilot(text, t.x_BLC_wo_prefix, schedule, control_tensors=ctrl)
        return pilot.code_space().loss_per_token(logits, t.labels).mean().item()

    with_control, without = run(True), run(False)
    print(f"toy task held-out loss: with control {with_control:.4f}, control zeroed {without:.4f}")
    assert with_control < 0.7 * without, (with_control, without)


def test_separated_weights_roundtrip_and_strict_car_loading(tmp_path):
    pilot = make_pilot()
    randomise_branch(pilot)
    save_separated_weights(pilot, tmp_path / "run", also_pth=True)
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {
        "infinity_base_weights.safetensors",
        "car_weights.safetensors",
        "car_config.json",
        "infinity_base_weights.pth",
        "car_weights.pth",
    }
    again = load_separated_weights(tmp_path / "run")
    text, ctrl = text_batch(2), controls_for(SCHEDULE)
    _, h, w = SCHEDULE[-1]
    x = teacher_inputs(torch.randn(2, 8, h, w), SCHEDULE)
    with torch.no_grad():
        torch.testing.assert_close(
            again(text, x, SCHEDULE, control_tensors=ctrl),
            pilot(text, x, SCHEDULE, control_tensors=ctrl),
            atol=1e-6,
            rtol=0,
        )
    # Wrapper prefixes and chunked CAR blocks are normalised.
    car = {k: v for k, v in pilot.state_dict().items() if k.startswith("car_")}
    wrapped = {
        f"_fsdp_wrapped_module.model.{k.replace('car_blocks.1.', 'car_blocks.0.module.1.')}": v for k, v in car.items()
    }
    wrapped = {
        k.replace("car_blocks.0.sa", "car_blocks.0.module.0.sa")
        if ".module." not in k.split("car_blocks")[-1][:12]
        else k: v
        for k, v in wrapped.items()
    }
    assert set(normalise_car_keys(wrapped)) == set(car)
    fresh = make_pilot()
    load_car_weights(fresh, wrapped)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in car.items())
    # Another car_depth: a readable error naming the keys.
    deeper = make_pilot(car_depth=1)
    with pytest.raises(
        CheckpointMismatchError, match=r"(?s)2 CAR blocks, the model car_depth=1.*unexpected.*car_blocks\.1"
    ):
        load_car_weights(deeper, tmp_path / "run" / "car_weights.safetensors")
    save_state_dict({"head.weight": torch.zeros(1)}, tmp_path / "nocar.safetensors")
    with pytest.raises(ValueError, match="no car_"):
        load_car_weights(fresh, tmp_path / "nocar.safetensors")


def test_an_unshuffled_control_stem_keeps_the_token_grid_and_round_trips(tmp_path):
    """control_unshuffle=2 folds 2x2 pixels into channels, so one stride-2 stage fewer gives the same grid."""
    pilot = make_pilot(control_channels=(8, 16, 32, 32), control_unshuffle=2)
    stem = pilot.car_control_convs
    assert pilot.control_patch == 16 and stem.downsample == 16 and stem.conv_in.in_channels == 3 * 4
    assert pilot.car_config()["control_unshuffle"] == 2
    randomise_branch(pilot)
    ctrl = controls_for(SCHEDULE)
    # The stem is its convolutions on the pixel-unshuffled control.
    plain = copy.deepcopy(stem)
    plain.unshuffle = 1
    with torch.no_grad():
        torch.testing.assert_close(stem(ctrl[-1]), plain(torch.nn.functional.pixel_unshuffle(ctrl[-1], 2)))
    text = text_batch(2)
    _, h, w = SCHEDULE[-1]
    x = teacher_inputs(torch.randn(2, 8, h, w), SCHEDULE)
    with torch.no_grad():
        out = pilot(text, x, SCHEDULE, control_tensors=ctrl)
        flipped = pilot(text, x, SCHEDULE, control_tensors=[-c for c in ctrl])
    assert torch.isfinite(out).all() and not torch.allclose(out, flipped)
    # car_config.json carries the setting: the reloaded pilot has the same stem and outputs.
    save_separated_weights(pilot, tmp_path / "run")
    again = load_separated_weights(tmp_path / "run")
    assert again.control_unshuffle == 2
    with torch.no_grad():
        torch.testing.assert_close(again(text, x, SCHEDULE, control_tensors=ctrl), out, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="control_unshuffle must be >= 1"):
        make_pilot(control_unshuffle=0)


def test_one_by_one_token_convs_sample_like_teacher_forcing_and_round_trip(tmp_path):
    """token_conv_kernel=1: car_var_conv and the stem's conv_out become per-token projections (an option; CAR is 3)."""
    from scenetxtvar.inference import load_checkpoint

    pilot = make_pilot(token_conv_kernel=1)
    c = pilot.C
    assert pilot.car_var_conv.weight.shape == (c, c, 1, 1)
    assert pilot.car_control_convs.conv_out.weight.shape == (c, 32, 1, 1)
    assert pilot.car_config()["token_conv_kernel"] == 1
    randomise_branch(pilot)
    text, ctrl = text_batch(2), controls_for(SCHEDULE)
    free = pilot.autoregressive_infer_cfg(
        scale_schedule=SCHEDULE, label_B_or_BLT=text, B=2, g_seed=0, control_tensors=ctrl, return_logits=True
    )
    acc = CodeAccumulator(SCHEDULE, 2, 8)
    inputs = [acc.add(k, bits_to_codes(b.squeeze(1).permute(0, 3, 1, 2))) for k, b in enumerate(free.scale_bits)]
    x = torch.cat(inputs[:-1], 1)
    with torch.no_grad():
        forced = pilot(text, x, SCHEDULE, control_tensors=ctrl)
    torch.testing.assert_close(forced, torch.cat(free.scale_logits, 1), atol=1e-4, rtol=0)
    # The export carries the kernel: reloaded, the same outputs; a 3x3-configured model refuses it by name.
    save_separated_weights(pilot, tmp_path / "run")
    again = load_separated_weights(tmp_path / "run")
    assert again.token_conv_kernel == 1
    with torch.no_grad():
        torch.testing.assert_close(again(text, x, SCHEDULE, control_tensors=ctrl), forced, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"token_conv_kernel: checkpoint 1, configured 3"):
        load_checkpoint(make_pilot(), tmp_path / "run")
    for bad in (0, 2):
        with pytest.raises(ValueError, match="token_conv_kernel must be an odd size"):
            make_pilot(token_conv_kernel=bad)


def test_official_fixture_base_loads_into_a_pilot():
    pilot = InfinityPilot(FIXTURES / "infinity_state_dict.pth", car_depth=2, control_channels=(8, 16, 32, 32, 32))
    ref = load_fixture("infinity_state_dict.pth")
    sd = pilot.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in ref.items())
    assert pilot.depth == 4 and pilot.text_channels == 256 and pilot.car_depth == 2
    assert not any(p.requires_grad for p in pilot.infinity_parameters())


def test_bad_inputs_raise_clear_errors():
    pilot = make_pilot()
    text = text_batch(2)
    _, h, w = SCHEDULE[-1]
    x = teacher_inputs(torch.randn(2, 8, h, w), SCHEDULE)
    ctrl = controls_for(SCHEDULE)
    with pytest.raises(ValueError, match="expected 7 control tensors"):
        pilot(text, x, SCHEDULE, control_tensors=ctrl[:-1])
    bad = list(ctrl)
    bad[3] = torch.zeros(2, 3, 10, 10)
    with pytest.raises(ValueError, match=r"scale 3 must be \(2, 3, 48, 96\), got \(2, 3, 10, 10\)"):
        pilot(text, x, SCHEDULE, control_tensors=bad)
    bad[3] = torch.zeros(2, 6, 48, 96)
    with pytest.raises(ValueError, match="scale 3"):
        pilot(text, x, SCHEDULE, control_tensors=bad)
    bad[3] = torch.full((2, 3, 48, 96), float("nan"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        pilot(text, x, SCHEDULE, control_tensors=bad)
    with pytest.raises(ValueError, match="car_depth=3 must be between 1 and depth // 2 = 2"):
        InfinityPilot(**{**SMALL, "car_depth": 3})
    bare = InfinityPilot(**SMALL, car_depth=2, init_car_modules=False)
    with pytest.raises(ValueError, match="no CAR modules"):
        bare(text, x, SCHEDULE, control_tensors=ctrl)
    bare.init_car_modules_if_needed()
    assert bare.has_car_modules()


def test_pilot_presets():
    with torch.device("meta"):
        p2b = timm.create_model("infinity_pilot_2b")
    assert p2b.car_depth == 8 and p2b.depth == 32
    tiny = timm.create_model("infinity_pilot_tiny")
    assert tiny.car_depth == 2 and tiny.control_patch == 16
