"""VAR multi-scale VQ-VAE: strict loading of the official layout and parity with official golden outputs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from scenetxtvar.checkpoint import CheckpointMismatchError
from scenetxtvar.tokenizers.vq import (
    VQVAE,
    PhiNonShared,
    PhiPartiallyShared,
    PhiShared,
    infer_vqvae_kwargs,
    load_vq_vae,
    phi_ticks,
)

FIXTURES = Path(__file__).parent / "fixtures"
SD_PATH = FIXTURES / "vqvae_state_dict.pth"
IO_PATH = FIXTURES / "vqvae_io.pth"
PATCH_NUMS = (1, 2, 3, 4)
FIXTURE_KWARGS = dict(vocab_size=64, z_channels=8, ch=32, quant_resi=0.5, share_quant_resi=4, v_patch_nums=PATCH_NUMS)
N_KEYS, N_PARAMS = 324, 4_375_003  # from the fixture manifest


@pytest.fixture(scope="module")
def raw_sd() -> dict[str, torch.Tensor]:
    """The official fixture state dict as stored (fp16)."""
    return torch.load(SD_PATH, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    """Official inputs and outputs."""
    return torch.load(IO_PATH, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def model() -> VQVAE:
    """The fixture VQVAE, loaded through the public loader."""
    return load_vq_vae(SD_PATH, v_patch_nums=PATCH_NUMS)


@pytest.fixture(scope="module")
def idx_Bl(io: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Official per-scale indices."""
    return [io[f"idx_Bl.{k}"] for k in range(len(PATCH_NUMS))]


def _code_maps(model: VQVAE, idx_Bl: list[torch.Tensor]) -> list[torch.Tensor]:
    """emb(idx).T reshaped to (B, Cvae, pn, pn), as the fixture's AR chain builds them."""
    B = idx_Bl[0].shape[0]
    return [
        model.quantize.embedding(idx).transpose(1, 2).reshape(B, model.code_dim, pn, pn)
        for idx, pn in zip(idx_Bl, PATCH_NUMS)
    ]


# ---------------------------------------------------------------------------------------------- loading
def test_fixture_is_fp16_and_loads_strictly_into_vqvae(raw_sd: dict[str, torch.Tensor], model: VQVAE) -> None:
    assert len(raw_sd) == N_KEYS
    assert all(v.dtype == torch.float16 for v in raw_sd.values())
    direct = VQVAE(**FIXTURE_KWARGS)
    result = direct.load_state_dict(raw_sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert sum(p.numel() for p in direct.parameters()) == N_PARAMS
    assert list(direct.state_dict()) == list(raw_sd)  # same key order as the official module tree
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32
        assert torch.equal(v, raw_sd[k].float()), k
        assert torch.equal(v, direct.state_dict()[k]), k


def test_loader_detects_fixture_architecture(model: VQVAE, raw_sd: dict[str, torch.Tensor]) -> None:
    assert (model.vocab_size, model.code_dim, model.downsample, model.patch_nums) == (64, 8, 16, PATCH_NUMS)
    assert model.ch_mult == (1, 1, 2, 2, 4)
    assert isinstance(model.quantize.quant_resi, PhiPartiallyShared)
    assert len(model.quantize.quant_resi.qresi_ls) == 4
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert infer_vqvae_kwargs(raw_sd)["share_quant_resi"] == 4


def test_checkpoint_with_other_scale_count_loads(raw_sd: dict[str, torch.Tensor]) -> None:
    # The usage buffer is (num_scales, V); like the official loader we keep the model's own buffer.
    full = load_vq_vae(raw_sd)
    assert full.patch_nums == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    assert full.quantize.ema_vocab_hit_SV.shape == (10, 64)
    assert raw_sd["quantize.ema_vocab_hit_SV"].dtype == torch.float16  # the caller's dict is untouched


@pytest.mark.parametrize("wrapper", ["vae", "state_dict"])
def test_nested_state_dicts_are_accepted(raw_sd: dict[str, torch.Tensor], wrapper: str, tmp_path: Path) -> None:
    path = tmp_path / "nested.pth"
    torch.save({wrapper: raw_sd}, path)
    loaded = load_vq_vae(path, v_patch_nums=PATCH_NUMS)
    assert torch.equal(loaded.quantize.embedding.weight, raw_sd["quantize.embedding.weight"].float())


# ----------------------------------------------------------------------------------------- phi selection
def test_phi_ticks_and_scale_mapping(model: VQVAE) -> None:
    assert phi_ticks(4).tolist() == pytest.approx([1 / 12, 0.3611111, 0.6388889, 11 / 12], abs=1e-6)
    assert phi_ticks(2).tolist() == pytest.approx([0.25, 0.75])
    phis = list(model.quantize.quant_resi.qresi_ls)
    assert [phis.index(model.quantize.phi(si, 4)) for si in range(4)] == [0, 1, 2, 3]
    ten = [phis.index(model.quantize.phi(si, 10)) for si in range(10)]
    assert ten == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


# -------------------------------------------------------------------------------------- official parity
@torch.no_grad()
def test_encoder_features(model: VQVAE, io: dict[str, torch.Tensor]) -> None:
    enc = model.encoder(io["img"])
    torch.testing.assert_close(enc, io["enc_out"], atol=1e-4, rtol=0)
    torch.testing.assert_close(model.quant_conv(enc), io["f"], atol=1e-4, rtol=0)
    f = model.encode_for_raw_features(io["img"])
    assert f.shape == (2, model.code_dim, 4, 4)
    torch.testing.assert_close(f, io["f"], atol=1e-4, rtol=0)


@torch.no_grad()
def test_img_to_idxBl_is_exact(model: VQVAE, io: dict[str, torch.Tensor], idx_Bl: list[torch.Tensor]) -> None:
    ours = model.img_to_idxBl(io["img"])
    assert len(ours) == len(PATCH_NUMS)
    for k, (got, want) in enumerate(zip(ours, idx_Bl)):
        assert got.dtype == torch.int64 and got.shape == (2, PATCH_NUMS[k] ** 2)
        assert torch.equal(got, want), f"scale {k}: {(got != want).sum().item()} indices differ"


@torch.no_grad()
def test_f_hat_per_scale(model: VQVAE, io: dict[str, torch.Tensor]) -> None:
    f_hats = model.quantize.f_to_idxBl_or_fhat(io["f"], to_fhat=True)
    for k, got in enumerate(f_hats):
        torch.testing.assert_close(got, io[f"f_hat.{k}"], atol=1e-5, rtol=0)


@torch.no_grad()
def test_var_input(model: VQVAE, io: dict[str, torch.Tensor], idx_Bl: list[torch.Tensor]) -> None:
    var_input = model.quantize.idxBl_to_var_input(idx_Bl)
    assert var_input.shape == (2, sum(p * p for p in PATCH_NUMS) - 1, model.code_dim)
    torch.testing.assert_close(var_input, io["var_input"], atol=1e-5, rtol=0)
    # The last scale is never used, so the shorter list gives the same result.
    torch.testing.assert_close(model.idxBl_to_var_input(idx_Bl[:-1]), var_input, atol=0, rtol=0)


@torch.no_grad()
def test_autoregressive_chain(model: VQVAE, io: dict[str, torch.Tensor], idx_Bl: list[torch.Tensor]) -> None:
    sn = len(PATCH_NUMS)
    f_hat = torch.zeros(2, model.code_dim, PATCH_NUMS[-1], PATCH_NUMS[-1])
    next_inputs = []
    for si, h in enumerate(_code_maps(model, idx_Bl)):
        f_hat, nxt = model.quantize.get_next_autoregressive_input(si, sn, f_hat, h)
        if si < sn - 1:
            assert nxt.shape == (2, model.code_dim, PATCH_NUMS[si + 1], PATCH_NUMS[si + 1])
            next_inputs.append(nxt.flatten(2).transpose(1, 2))
    torch.testing.assert_close(torch.cat(next_inputs, dim=1), io["ar_next_inputs"], atol=1e-5, rtol=0)
    torch.testing.assert_close(f_hat, io["ar_f_hat_final"], atol=1e-5, rtol=0)


@torch.no_grad()
def test_embed_to_fhat_last(model: VQVAE, io: dict[str, torch.Tensor], idx_Bl: list[torch.Tensor]) -> None:
    f_hat = model.quantize.embed_to_fhat(_code_maps(model, idx_Bl), all_to_max_scale=True, last_one=True)
    torch.testing.assert_close(f_hat, io["embed_to_fhat_last"], atol=1e-5, rtol=0)
    running = model.quantize.embed_to_fhat(_code_maps(model, idx_Bl), all_to_max_scale=True, last_one=False)
    for k, got in enumerate(running):  # the running sums equal the encoder's f_hat per scale
        torch.testing.assert_close(got, io[f"f_hat.{k}"], atol=1e-5, rtol=0)


@torch.no_grad()
def test_idxBl_to_img_and_decode(model: VQVAE, io: dict[str, torch.Tensor], idx_Bl: list[torch.Tensor]) -> None:
    img = model.idxBl_to_img(idx_Bl, same_shape=True, last_one=True)
    torch.testing.assert_close(img, io["img_recon_idxBl_to_img"], atol=1e-3, rtol=0)
    assert img.min() >= -1 and img.max() <= 1
    torch.testing.assert_close(model.decode(io["embed_to_fhat_last"]), img, atol=1e-3, rtol=0)
    per_scale = model.idxBl_to_img(idx_Bl, same_shape=True, last_one=False)
    assert len(per_scale) == len(PATCH_NUMS)
    torch.testing.assert_close(per_scale[-1], img, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------- architecture detection
@pytest.mark.parametrize("share_quant_resi", [2, 1, 0])
def test_architecture_detection_roundtrip(share_quant_resi: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    patch_nums = (1, 2, 4)
    original = VQVAE(vocab_size=32, z_channels=4, ch=32, share_quant_resi=share_quant_resi, v_patch_nums=patch_nums)
    sd = original.state_dict()
    torch.save(sd, tmp_path / "vae.pth")
    save_file(sd, str(tmp_path / "vae.safetensors"))
    detected = infer_vqvae_kwargs(sd)
    assert detected["vocab_size"] == 32 and detected["z_channels"] == 4 and detected["ch"] == 32
    assert detected["ch_mult"] == (1, 1, 2, 2, 4) and detected["num_res_blocks"] == 2
    assert detected["share_quant_resi"] == share_quant_resi
    phi_type = {0: PhiNonShared, 1: PhiShared, 2: PhiPartiallyShared}[share_quant_resi]

    img = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        want_idx = original.img_to_idxBl(img)
        want_img = original.idxBl_to_img(want_idx, same_shape=True, last_one=True)
        for name in ("vae.pth", "vae.safetensors"):
            loaded = load_vq_vae(tmp_path / name, v_patch_nums=patch_nums)
            assert (loaded.vocab_size, loaded.code_dim, loaded.patch_nums) == (32, 4, patch_nums)
            assert isinstance(loaded.quantize.quant_resi, phi_type)
            got_idx = loaded.img_to_idxBl(img)
            assert all(torch.equal(a, b) for a, b in zip(got_idx, want_idx))
            assert torch.equal(loaded.idxBl_to_img(got_idx, same_shape=True, last_one=True), want_img)


def test_detects_non_default_encoder_layout() -> None:
    small = VQVAE(
        vocab_size=16,
        z_channels=4,
        ch=32,
        v_patch_nums=(1, 2),
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        using_sa=False,
        using_mid_sa=False,
    )
    loaded = load_vq_vae({"state_dict": small.state_dict()}, v_patch_nums=(1, 2))
    assert loaded.ch_mult == (1, 2, 2) and loaded.downsample == 4
    assert infer_vqvae_kwargs(small.state_dict())["using_sa"] is False
    img = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(
            loaded.img_to_reconstructed_img(img, last_one=True),
            small.img_to_reconstructed_img(img, last_one=True),
        )


# ------------------------------------------------------------------------------------------- bad inputs
def test_image_size_not_divisible(model: VQVAE) -> None:
    with pytest.raises(ValueError, match="60x60"):
        model.img_to_idxBl(torch.zeros(1, 3, 60, 60))


def test_image_with_four_channels(model: VQVAE) -> None:
    with pytest.raises(ValueError, match="expected 3 image channels, got 4"):
        model.encode_for_raw_features(torch.zeros(1, 4, 64, 64))


def test_image_size_not_matching_schedule(model: VQVAE) -> None:
    with pytest.raises(ValueError, match="last patch number"):
        model.img_to_idxBl(torch.zeros(1, 3, 128, 128))


def test_idx_list_must_match_schedule(model: VQVAE, idx_Bl: list[torch.Tensor]) -> None:
    with pytest.raises(ValueError, match="expected 4 index tensors"):
        model.idxBl_to_img(idx_Bl[:3], same_shape=True, last_one=True)
    with pytest.raises(ValueError, match=r"index tensor 2 has shape \(2, 8\)"):
        model.idxBl_to_img([*idx_Bl[:2], idx_Bl[2][:, :8], idx_Bl[3]], same_shape=True)
    with pytest.raises(ValueError, match="outside"):
        model.idxBl_to_img([*idx_Bl[:3], idx_Bl[3] + 64], same_shape=True)
    with pytest.raises(ValueError, match="integer"):
        model.quantize.idxBl_to_var_input([i.float() for i in idx_Bl])


def test_missing_key_is_listed(raw_sd: dict[str, torch.Tensor]) -> None:
    sd = {k: v for k, v in raw_sd.items() if k != "decoder.conv_out.bias"}
    with pytest.raises(CheckpointMismatchError, match=r"1 missing key\(s\): decoder\.conv_out\.bias$"):
        load_vq_vae(sd, v_patch_nums=PATCH_NUMS)


def test_missing_detection_key(raw_sd: dict[str, torch.Tensor]) -> None:
    sd = {k: v for k, v in raw_sd.items() if k != "quantize.embedding.weight"}
    with pytest.raises(ValueError, match="quantize.embedding.weight"):
        load_vq_vae(sd)


def test_unexpected_key_is_listed(raw_sd: dict[str, torch.Tensor]) -> None:
    sd = {**raw_sd, "decoder.extra.weight": torch.zeros(3)}
    with pytest.raises(CheckpointMismatchError, match=r"1 unexpected key\(s\): decoder\.extra\.weight$"):
        load_vq_vae(sd, v_patch_nums=PATCH_NUMS)


def test_misshaped_key_is_listed(raw_sd: dict[str, torch.Tensor]) -> None:
    sd = {**raw_sd, "post_quant_conv.weight": torch.zeros(8, 8, 1, 1)}
    # checkpoint's shape != model's
    with pytest.raises(
        CheckpointMismatchError,
        match=r"1 mis-shaped key\(s\): post_quant_conv\.weight \(8, 8, 1, 1\) != \(8, 8, 3, 3\)$",
    ):
        load_vq_vae(sd, v_patch_nums=PATCH_NUMS)


def test_usage_buffer_with_other_vocab_is_misshaped(raw_sd: dict[str, torch.Tensor]) -> None:
    # Only the scale count of ema_vocab_hit_SV may differ; another vocabulary size is a real mismatch.
    sd = {**raw_sd, "quantize.ema_vocab_hit_SV": torch.zeros(10, 32)}
    with pytest.raises(
        CheckpointMismatchError, match=r"1 mis-shaped key\(s\): quantize\.ema_vocab_hit_SV \(10, 32\)"
    ) as e:
        load_vq_vae(sd, v_patch_nums=PATCH_NUMS)
    assert "does not match VQVAE({" in str(e.value) and not e.value.missing and not e.value.unexpected


def test_unknown_override() -> None:
    with pytest.raises(ValueError, match="unknown VQVAE option"):
        load_vq_vae(SD_PATH, patch_nums=PATCH_NUMS)


@pytest.mark.parametrize("kind", ["garbage.pth", "truncated.pth", "garbage.safetensors", "tensor.pth"])
def test_not_a_checkpoint(kind: str, tmp_path: Path) -> None:
    path = tmp_path / kind
    if kind.startswith("garbage"):
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    elif kind == "truncated.pth":
        path.write_bytes(SD_PATH.read_bytes()[:100_000])
    else:
        torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match=re.escape(str(path))) as e:
        load_vq_vae(path)
    assert "VQVAE checkpoint" in str(e.value)  # names the kind of checkpoint expected


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"VQVAE checkpoint not found: .*nope\.pth"):
        load_vq_vae(tmp_path / "nope.pth")
