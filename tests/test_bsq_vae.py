"""BSQ-VAE tokenizer: strict loading of the official layout and numerics against official fixtures.

Fixtures (copied from the official-code run, see the fixture README section 2): a d32 patch-16
BSQ-VAE with base_ch 24 and ch_mult (1,1,1,1,1), a 96x96 image and the schedule 1,2,4,6.
Tolerances follow the fixture README section 4.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from scenetxtvar import bitwise
from scenetxtvar.checkpoint import CheckpointMismatchError
from scenetxtvar.tokenizers.bsq import (
    BSQVAE,
    BSQVAEConfig,
    bit_mask,
    convert_legacy_keys,
    detect_config,
    load_bsq_vae,
)

FIXTURES = Path(__file__).parent / "fixtures"
SCHEDULE = [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 6, 6)]
K = len(SCHEDULE)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """These models are tiny: one intra-op thread is faster and immune to OpenMP spin-wait
    slowdowns when other processes share the two cores (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def raw_sd() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / "vae_state_dict.pth", map_location="cpu", weights_only=True)["vae"]


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / "vae_io.pth", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def vae() -> BSQVAE:
    return load_bsq_vae(FIXTURES / "vae_state_dict.pth")


@pytest.fixture(scope="module")
def outputs(vae: BSQVAE, io: dict[str, torch.Tensor]) -> dict[str, object]:
    """Everything computed once from the fixture image."""
    with torch.no_grad():
        feats = vae.encode_for_raw_features(io["img"])
        quant = vae.quantize_features(feats, SCHEDULE)
        summed, bits = vae.encode(io["img"], SCHEDULE)
        recon = vae.decode(io["quant_summed"])
        fixture_bits = [io[f"quant_bits.{k}"] for k in range(K)]
        dfb_summed, dfb_img = vae.decode_from_bits(fixture_bits, SCHEDULE)
    return dict(
        feats=feats,
        quant=quant,
        summed=summed,
        bits=bits,
        recon=recon,
        dfb_summed=dfb_summed,
        dfb_img=dfb_img,
    )


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def test_strict_load_and_detected_config(vae: BSQVAE, raw_sd: dict[str, torch.Tensor]) -> None:
    cfg = vae.config
    assert (cfg.base_ch, cfg.ch_mult, cfg.num_res_blocks, cfg.patch_size, cfg.codebook_dim) == (
        24, (1, 1, 1, 1, 1), 2, 16, 32,
    )  # fmt: skip
    assert cfg.decoder_ch_mult is None
    assert (vae.code_dim, vae.patch_size, vae.downsample) == (32, 16, 16)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    # Same key set, order and shapes as the official model (vae_keys.txt: 262 keys).
    ours = vae.state_dict()
    assert list(ours) == list(raw_sd) and len(ours) == 262
    assert all(ours[k].shape == v.shape and ours[k].dtype == v.dtype for k, v in raw_sd.items())
    assert all(torch.equal(ours[k], v) for k, v in raw_sd.items())
    # 361,811 parameters (the fixture's count); the mask buffer adds 32 elements (stored twice).
    assert sum(p.numel() for p in vae.parameters()) == 361_811
    assert vae.quantize is vae.quantizer
    assert torch.equal(ours["quantize.lfq.mask"], 2 ** torch.arange(31, -1, -1))


def test_keys_match_official_list(raw_sd: dict[str, torch.Tensor]) -> None:
    """The released d32 (patch 16) and d14 (patch 8) layouts, built from scratch, match the notes."""
    # Key counts and parameter totals from infinity.md 6.2 (270 / 226 keys, 110.12 M / 81.62 M).
    with torch.device("meta"):  # shapes only: no 110 M-parameter allocation
        d32 = BSQVAE(BSQVAEConfig()).state_dict()
        d14 = BSQVAE(BSQVAEConfig(ch_mult=(1, 2, 4, 4), patch_size=8, codebook_dim=14)).state_dict()
    assert len(d32) == 270 and abs(sum(v.numel() for v in d32.values()) / 1e6 - 110.12) < 0.01
    assert d32["decoder.up.1.block.0.nin_shortcut.conv.weight"].shape == (256, 512, 1, 1)
    assert "encoder.down.4.downsample.conv.conv.weight" not in d32
    assert "decoder.up.0.upsample.conv.conv.weight" not in d32
    assert len(d14) == 226 and abs(sum(v.numel() for v in d14.values()) / 1e6 - 81.62) < 0.01
    assert d14["encoder.conv_out.conv.weight"].shape == (14, 512, 3, 3)
    assert d14["quantizer.lfq.mask"].shape == (14,) and d14["quantizer.lfq.mask"].dtype == torch.int64
    assert bit_mask(14).tolist() == [2**i for i in range(13, -1, -1)]


# ------------------------------------------------------------------------------------------------
# Numerics against the official fixtures
# ------------------------------------------------------------------------------------------------


def test_encoder_features(outputs: dict, io: dict[str, torch.Tensor]) -> None:
    assert outputs["feats"].dtype == torch.float32
    assert max_diff(outputs["feats"], io["enc_features"]) < 1e-4


def test_quantizer_bits_codes_and_sum(vae: BSQVAE, outputs: dict, io: dict[str, torch.Tensor]) -> None:
    for k, (_, h, w) in enumerate(SCHEDULE):
        bits = outputs["bits"][k]
        assert bits.shape == (2, 1, h, w, 32) and bits.dtype == torch.int32
        assert torch.equal(bits, io[f"quant_bits.{k}"].int()), f"scale {k}"
        assert torch.equal(outputs["quant"].scale_bits[k], bits)
        codes = vae.indices_to_codes(bits)
        assert codes.shape == (2, 32, 1, h, w)
        assert max_diff(codes, io[f"quant_codes.{k}"]) < 1e-6
    assert max_diff(outputs["summed"], io["quant_summed"]) < 1e-6
    assert max_diff(outputs["quant"].summed_codes, io["quant_summed"]) < 1e-6


def test_legacy_area_var_input(outputs: dict, io: dict[str, torch.Tensor]) -> None:
    var_inputs = outputs["quant"].var_inputs
    assert len(var_inputs) == K - 1
    for k, v in enumerate(var_inputs):
        assert max_diff(v, io[f"quant_var_input_area.{k}"].squeeze(2)) < 1e-6


def test_bitwise_targets_from_encoder_features(outputs: dict, io: dict[str, torch.Tensor]) -> None:
    targets = bitwise.build_targets(outputs["feats"], SCHEDULE)
    assert max_diff(targets.x_BLC_wo_prefix, io["bsc_x_BLC_wo_prefix"]) < 1e-6
    gt = torch.cat([io[f"bsc_gt_bits.{k}"] for k in range(K)], dim=1).long()
    assert torch.equal(targets.gt_bits, gt)
    # The transformer's targets and the tokenizer's quantiser agree bit for bit.
    for k in range(K):
        assert torch.equal(targets.scale_bits[k], outputs["bits"][k])


def test_decode(outputs: dict, io: dict[str, torch.Tensor]) -> None:
    assert max_diff(outputs["recon"], io["img_recon"]) < 1e-3
    assert max_diff(outputs["dfb_summed"], io["decode_from_indices_summed_codes"].squeeze(2)) < 1e-6
    assert max_diff(outputs["dfb_img"], io["img_recon"]) < 1e-3
    for img in (outputs["recon"], outputs["dfb_img"]):
        assert img.shape == (2, 3, 96, 96) and img.min() >= -1 and img.max() <= 1


def test_decode_accepts_official_5d_latent(vae: BSQVAE, io: dict[str, torch.Tensor]) -> None:
    z5 = io["decode_from_indices_summed_codes"]
    with torch.no_grad():
        assert torch.equal(vae.decode(z5), vae.decode(z5.squeeze(2)))


# ------------------------------------------------------------------------------------------------
# Naming styles and architecture detection
# ------------------------------------------------------------------------------------------------


def to_legacy(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official -> legacy spelling: drop the wrapper level of every conv / norm key."""
    return {k.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias")
            .replace(".norm.weight", ".weight").replace(".norm.bias", ".bias"): v
            for k, v in sd.items()}  # fmt: skip


def test_legacy_names_load_identically(raw_sd: dict, io: dict, outputs: dict) -> None:
    legacy = to_legacy(raw_sd)
    assert "encoder.conv_in.weight" in legacy and "encoder.down.0.downsample.conv.weight" in legacy
    assert "encoder.norm_out.weight" in legacy and "encoder.conv_in.conv.weight" not in legacy
    converted, renamed = convert_legacy_keys(legacy)
    assert converted.keys() == raw_sd.keys() and renamed == 262 - 2
    # Mixed styles also convert (only the legacy ones are renamed).
    items = list(raw_sd.items())
    mixed = {**dict(items[3:]), **to_legacy(dict(items[:3]))}
    converted, renamed = convert_legacy_keys(mixed)
    assert renamed == 3 and converted.keys() == raw_sd.keys()
    vae = load_bsq_vae({"vae": legacy})
    with torch.no_grad():
        summed, bits = vae.encode(io["img"], SCHEDULE)
        recon = vae.decode(summed)
    assert torch.equal(summed, outputs["summed"])
    assert all(torch.equal(a, b) for a, b in zip(bits, outputs["bits"]))
    assert torch.equal(recon, vae.decode(outputs["summed"]))


def test_both_spellings_of_one_key_rejected(raw_sd: dict) -> None:
    sd = dict(raw_sd)
    sd["encoder.conv_in.weight"] = sd["encoder.conv_in.conv.weight"]
    with pytest.raises(ValueError, match="both the legacy and the wrapped name"):
        load_bsq_vae(sd)


OTHER = BSQVAEConfig(base_ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, patch_size=8, codebook_dim=16)


@pytest.fixture(scope="module")
def other_vae() -> BSQVAE:
    torch.manual_seed(0)
    model = BSQVAE(OTHER).eval()
    with torch.no_grad():  # non-trivial norm affines so a wrong mapping would show
        for mod in model.modules():
            if isinstance(mod, torch.nn.GroupNorm):
                mod.weight.mul_(1 + 0.1 * torch.randn_like(mod.weight))
                mod.bias.add_(0.1 * torch.randn_like(mod.bias))
    return model


@pytest.mark.parametrize("fmt", ["plain", "vae_dict", "safetensors", "loaded_dict"])
def test_detection_round_trip(other_vae: BSQVAE, fmt: str, tmp_path: Path) -> None:
    sd = other_vae.state_dict()
    if fmt == "plain":
        torch.save(sd, tmp_path / "vae.pth")
        source = tmp_path / "vae.pth"
    elif fmt == "vae_dict":
        torch.save({"vae": sd, "epoch": torch.tensor(3)}, tmp_path / "vae.pth")
        source = str(tmp_path / "vae.pth")
    elif fmt == "safetensors":
        # safetensors refuses shared storage: the mask is shared by quantizer/quantize.
        save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(tmp_path / "vae.safetensors"))
        source = tmp_path / "vae.safetensors"
    else:
        source = {"vae": dict(sd)}
    loaded = load_bsq_vae(source)
    assert loaded.config == OTHER
    assert (loaded.code_dim, loaded.patch_size) == (16, 8)
    img = torch.rand(2, 3, 32, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    sched = [(1, 1), (2, 2), (4, 3)]
    with torch.no_grad():
        ref_summed, ref_bits = other_vae.encode(img, sched)
        summed, bits = loaded.encode(img, sched)
        assert summed.shape == (2, 16, 4, 3)
        assert torch.equal(summed, ref_summed)
        assert all(torch.equal(a, b) for a, b in zip(bits, ref_bits))
        assert torch.equal(loaded.decode(summed), other_vae.decode(ref_summed))


def test_detection_of_released_layouts() -> None:
    for cfg in (
        BSQVAEConfig(),
        BSQVAEConfig(codebook_dim=64),
        BSQVAEConfig(ch_mult=(1, 2, 4, 4), patch_size=8, codebook_dim=14),
        BSQVAEConfig(base_ch=64, ch_mult=(1, 2, 2), decoder_ch_mult=(1, 1, 2), patch_size=4, num_res_blocks=3),
        BSQVAEConfig(base_ch=16, ch_mult=(1, 2, 2), patch_size=8, norm_groups=0, pixel_unshuffle=2),
    ):
        with torch.device("meta"):
            sd = BSQVAE(cfg).state_dict()
        assert detect_config(sd) == cfg
        assert detect_config(convert_legacy_keys(to_legacy(sd))[0]) == cfg


def test_missing_masks_are_regenerated(raw_sd: dict) -> None:
    sd = {k: v for k, v in raw_sd.items() if "lfq.mask" not in k}
    vae = load_bsq_vae(sd)
    assert torch.equal(vae.state_dict()["quantizer.lfq.mask"], raw_sd["quantizer.lfq.mask"])
    only_alias = {k: v for k, v in raw_sd.items() if k != "quantizer.lfq.mask"}
    assert torch.equal(load_bsq_vae(only_alias).state_dict()["quantize.lfq.mask"], raw_sd["quantize.lfq.mask"])
    # dq = 64 wraps in int64 exactly like the official buffer (2**63 -> -2**63).
    assert bit_mask(64)[0].item() == -(2**63) and bit_mask(64)[1].item() == 2**62


def test_overrides(raw_sd: dict) -> None:
    with pytest.raises(ValueError, match="unknown BSQVAEConfig override"):
        load_bsq_vae(raw_sd, not_a_field=1)
    with pytest.raises(ValueError, match="mis-shaped"):
        load_bsq_vae(raw_sd, codebook_dim=16)


# ------------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------------


def test_codes_are_exact_and_round_trip(vae: BSQVAE, outputs: dict) -> None:
    s = torch.tensor(1 / math.sqrt(32), dtype=torch.float32)
    for bits in outputs["bits"]:
        codes = vae.indices_to_codes(bits)
        assert torch.equal(codes.abs(), s.expand_as(codes))
        back = (codes > 0).int().movedim(1, -1)
        assert torch.equal(back, bits)
    # The quantiser's own codes (summed at the latent grid) are exact too at the last scale.
    codes, qbits = vae.quantizer.lfq(torch.randn(2, 32, 3, 5))
    assert torch.equal(codes.abs(), s.expand_as(codes))
    assert torch.equal(vae.indices_to_codes(qbits.movedim(1, -1)), codes)


def test_zero_noise_equals_no_noise(outputs: dict) -> None:
    feats = outputs["feats"]
    clean = bitwise.build_targets(feats, SCHEDULE)
    zero = bitwise.build_targets(feats, SCHEDULE, noise_strength=0.0, noise_layers=K)
    assert torch.equal(clean.x_BLC_wo_prefix, zero.x_BLC_wo_prefix)
    assert torch.equal(clean.gt_bits, zero.gt_bits)


def test_decode_in_range(vae: BSQVAE) -> None:
    with torch.no_grad():
        img = vae.decode(torch.randn(1, 32, 2, 3) * 10)
    assert img.shape == (1, 3, 32, 48) and img.min() >= -1 and img.max() <= 1


def test_straight_through_gradient(vae: BSQVAE) -> None:
    feats = torch.randn(1, 32, 6, 6, requires_grad=True)
    out = vae.quantize_features(feats, SCHEDULE)
    out.summed_codes.sum().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0


def test_partial_bits_decode(vae: BSQVAE, io: dict) -> None:
    bits = [io[f"quant_bits.{k}"] for k in range(2)]
    summed = vae.bits_to_summed_codes(bits, SCHEDULE)
    ref = sum(bitwise.trilinear_resize(vae.indices_to_codes(b).squeeze(2), (6, 6)) for b in bits)
    assert summed.shape == (2, 32, 6, 6) and max_diff(summed, ref) == 0


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_image_errors(vae: BSQVAE) -> None:
    with pytest.raises(ValueError, match="divisible by the patch size 16"):
        vae.encode(torch.zeros(1, 3, 90, 90), [(1, 1)])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae.encode_for_raw_features(torch.zeros(1, 1, 96, 96))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae.encode_for_raw_features(torch.zeros(3, 96, 96))


def test_schedule_errors(vae: BSQVAE, outputs: dict, io: dict) -> None:
    feats = outputs["feats"]
    with pytest.raises(ValueError, match="does not match the latent grid"):
        vae.quantize_features(feats, [(1, 1), (2, 2), (4, 4)])
    with pytest.raises(ValueError, match="does not match the latent grid"):
        vae.encode(io["img"], [(1, 1), (8, 8)])
    with pytest.raises(ValueError, match="exceed the latent grid"):
        vae.quantize_features(feats, [(1, 1), (8, 8), (6, 6)])
    with pytest.raises(ValueError, match="t = 1"):
        vae.quantize_features(feats, [(1, 1, 1), (2, 6, 6)])
    bits = [io[f"quant_bits.{k}"] for k in range(K)]
    with pytest.raises(ValueError, match="bits of scale 1"):
        vae.decode_from_bits([bits[0], bits[2]], SCHEDULE)
    with pytest.raises(ValueError, match="expected 1..4"):
        vae.decode_from_bits(bits + bits[:1], SCHEDULE)


def test_bits_and_latent_dim_errors(vae: BSQVAE) -> None:
    with pytest.raises(ValueError, match=r"\(B, \.\.\., 32\)"):
        vae.indices_to_codes(torch.zeros(2, 1, 2, 2, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="bits of scale 0"):
        vae.decode_from_bits([torch.zeros(2, 1, 6, 6, 16, dtype=torch.int32)], [(6, 6)])
    with pytest.raises(ValueError, match="latent must be"):
        vae.decode(torch.zeros(1, 16, 6, 6))
    with pytest.raises(ValueError, match="features must be"):
        vae.quantize_features(torch.zeros(1, 16, 6, 6), [(6, 6)])


def test_missing_extra_and_misshaped_keys(raw_sd: dict) -> None:
    sd = dict(raw_sd)
    del sd["decoder.mid.block_2.conv1.conv.bias"]
    with pytest.raises(
        CheckpointMismatchError, match=r"1 missing key\(s\): decoder\.mid\.block_2\.conv1\.conv\.bias$"
    ) as e:
        load_bsq_vae(sd)
    assert "does not match the BSQ-VAE BSQVAEConfig(" in str(e.value)
    assert e.value.unexpected == [] and e.value.mis_shaped == [] and "unexpected" not in str(e.value)

    sd = {**raw_sd, "encoder.mid.attn_1.q.conv.weight": torch.zeros(24, 24, 1, 1)}
    with pytest.raises(CheckpointMismatchError, match=r"1 unexpected key\(s\): encoder\.mid\.attn_1\.q\.conv\.weight$"):
        load_bsq_vae(sd)

    sd = {**raw_sd, "encoder.down.1.block.0.conv2.conv.weight": torch.zeros(24, 24, 1, 1)}
    # checkpoint's shape != model's
    with pytest.raises(
        CheckpointMismatchError,
        match=r"1 mis-shaped key\(s\): encoder\.down\.1\.block\.0\.conv2\.conv\.weight "
        r"\(24, 24, 1, 1\) != \(24, 24, 3, 3\)$",
    ):
        load_bsq_vae(sd)


def test_file_errors(tmp_path: Path, raw_sd: dict) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match=r"garbage\.pth is not a readable BSQ-VAE checkpoint"):
        load_bsq_vae(garbage)

    truncated = tmp_path / "truncated.pth"
    torch.save({"vae": raw_sd}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"truncated\.pth is not a readable BSQ-VAE checkpoint"):
        load_bsq_vae(truncated)

    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"bad\.safetensors is not a readable BSQ-VAE checkpoint"):
        load_bsq_vae(bad_st)

    other = tmp_path / "transformer.pth"
    torch.save({"word_embed.weight": torch.zeros(4, 4), "head.weight": torch.zeros(4, 4)}, other)
    with pytest.raises(ValueError, match=r"transformer\.pth: not a BSQ-VAE checkpoint.*word_embed"):
        load_bsq_vae(other)

    with pytest.raises(FileNotFoundError, match=r"BSQ-VAE checkpoint not found: .*nope\.pth"):
        load_bsq_vae(tmp_path / "nope.pth")

    # A VAR-style VQ-VAE (conv keys without wrappers, attention, a codebook) is rejected strictly.
    vq = {
        "encoder.conv_in.weight": torch.zeros(32, 3, 3, 3),
        "encoder.conv_out.weight": torch.zeros(8, 32, 3, 3),
        "quantize.embedding.weight": torch.zeros(64, 8),
    }
    with pytest.raises(ValueError, match="cannot find the encoder levels"):
        load_bsq_vae(vq)


def test_invalid_configs() -> None:
    with pytest.raises(ValueError, match="power of two"):
        BSQVAEConfig(patch_size=12)
    with pytest.raises(ValueError, match="more than log2"):
        BSQVAEConfig(ch_mult=(1, 2, 4, 4), patch_size=16)
    with pytest.raises(ValueError, match="divisible by 32 or 24"):
        BSQVAEConfig(base_ch=40)
    with pytest.raises(ValueError, match="norm_groups=3 must be >= 1 and divide every width"):
        BSQVAEConfig(base_ch=32, norm_groups=3)


def test_norm_groups_shape_the_norms_and_travel_in_the_export_metadata(tmp_path: Path) -> None:
    """GroupNorm groups leave no trace in a state dict: our export carries them, official files default."""
    from scenetxtvar.training.tokenizer_stage import export_tokenizer

    cfg = BSQVAEConfig(base_ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, patch_size=8, codebook_dim=8, norm_groups=2)
    torch.manual_seed(0)
    model = BSQVAE(cfg).eval()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and {m.num_groups for m in norms} == {2}
    path = export_tokenizer(model, tmp_path / "export")
    loaded = load_bsq_vae(path)
    assert loaded.config == cfg
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(
            loaded.decode(loaded.encode(img, [(1, 1), (4, 4)])[0]), model.decode(model.encode(img, [(1, 1), (4, 4)])[0])
        )
    # The same tensors without our metadata (an official-style file) get the official grouping, which
    # 16 channels cannot have: the error says what to set.
    plain = tmp_path / "plain.safetensors"
    save_file(
        {k: v.clone().contiguous() for k, v in model.state_dict().items() if not k.startswith("quantize.")}, str(plain)
    )
    with pytest.raises(ValueError, match="or set norm_groups"):
        load_bsq_vae(plain)
    assert load_bsq_vae(plain, norm_groups=2).config == cfg
    # An explicit override wins over the metadata.
    assert load_bsq_vae(path, norm_groups=1).config.norm_groups == 1


def test_norm_free_tokenizer_has_no_norm_weights_and_round_trips(tmp_path: Path) -> None:
    """norm_groups=0 drops every GroupNorm; exports load back as norm-free, with or without metadata."""
    from scenetxtvar.training.tokenizer_stage import export_tokenizer

    cfg = BSQVAEConfig(base_ch=8, ch_mult=(1, 1, 2, 2), num_res_blocks=1, patch_size=8, codebook_dim=8, norm_groups=0)
    torch.manual_seed(0)
    model = BSQVAE(cfg).eval()
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    assert not any(".norm" in k for k in model.state_dict())
    img = torch.rand(2, 3, 32, 64) * 2 - 1
    grids = [(1, 1), (2, 4), (4, 8)]
    with torch.no_grad():
        want = model.decode(model.encode(img, grids)[0])
    path = export_tokenizer(model, tmp_path / "export")
    plain = tmp_path / "plain.safetensors"  # no metadata: the missing norm weights say "norm-free"
    save_file(
        {k: v.clone().contiguous() for k, v in model.state_dict().items() if not k.startswith("quantize.")}, str(plain)
    )
    for source in (path, plain):
        loaded = load_bsq_vae(source)
        assert loaded.config == cfg
        with torch.no_grad():
            assert torch.equal(loaded.decode(loaded.encode(img, grids)[0]), want)


def test_pixel_unshuffle_moves_the_first_level_to_lower_resolution(tmp_path: Path) -> None:
    """r = 2: conv_in sees 12 channels at half resolution, conv_out writes 12 that depth-to-space makes RGB;
    the latent grid is still image / patch_size, and the export loads back to the same architecture."""
    cfg = BSQVAEConfig(base_ch=16, ch_mult=(1, 2, 2), patch_size=8, codebook_dim=32, norm_groups=0, pixel_unshuffle=2)
    vae = BSQVAE(cfg)
    assert vae.encoder.conv_in.conv.weight.shape == (16, 12, 3, 3)
    assert vae.decoder.conv_out.conv.weight.shape == (12, 16, 3, 3)
    x = torch.rand(2, 3, 64, 128) * 2 - 1
    feats = vae.encode_for_raw_features(x)
    assert feats.shape == (2, 32, 8, 16) and vae.decode(feats).shape == (2, 3, 64, 128)
    # Depth-to-space inverts space-to-depth: the first conv's input is exactly the unshuffled image.
    seen = {}
    hook = vae.encoder.conv_in.register_forward_hook(lambda m, args, out: seen.update(input=args[0]))
    vae.encode_for_raw_features(x)
    hook.remove()
    assert torch.equal(torch.nn.functional.pixel_shuffle(seen["input"], 2), x)
    from scenetxtvar.training.tokenizer_stage import export_tokenizer

    loaded = load_bsq_vae(export_tokenizer(vae, tmp_path))
    assert loaded.config == cfg
    assert torch.equal(loaded.encode_for_raw_features(x), vae.encode_for_raw_features(x))
    # The released layouts keep r = 1; r must be a power of two within the patch, and the conv levels
    # must cover log2(patch / r) downsamples.
    assert BSQVAEConfig().pixel_unshuffle == 1
    for bad in (3, 16):
        with pytest.raises(ValueError, match="pixel_unshuffle"):
            BSQVAEConfig(patch_size=8, ch_mult=(1, 2), pixel_unshuffle=bad)
    with pytest.raises(ValueError, match="levels"):
        BSQVAEConfig(patch_size=8, ch_mult=(1, 2), pixel_unshuffle=2)
