"""The code-space protocol: one transformer over BSQ bits or VQ indices, trained and sampled the same way."""

from __future__ import annotations

import pytest
import torch
from conftest import FIXTURES

from scenetxtvar.bitwise import BitwiseCodes
from scenetxtvar.codes import sample_from_logits
from scenetxtvar.models.infinity import Infinity
from scenetxtvar.tokenizers import BSQVAE, BSQVAEConfig, IndexCodes, load_vq_vae


def tiny_bsq() -> BSQVAE:
    torch.manual_seed(0)
    return BSQVAE(BSQVAEConfig(base_ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, patch_size=4, codebook_dim=8)).eval()


@pytest.fixture(scope="module")
def vq():
    return load_vq_vae(FIXTURES / "vqvae_state_dict.pth", v_patch_nums=(1, 2, 3, 4))


BSQ_SCHEDULE = [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
VQ_SCHEDULE = [(1, 1, 1), (1, 2, 2), (1, 3, 3), (1, 4, 4)]


def tiny_infinity(**kw) -> Infinity:
    torch.manual_seed(0)
    model = Infinity(
        depth=2, embed_dim=64, num_heads=2, text_channels=128, text_maxlen=8, block_chunks=1, cond_drop_rate=0.0, **kw
    )
    model.init_weights(head_scale=1.0)
    return model


def text_for(batch: int, dim: int = 128):
    g = torch.Generator().manual_seed(1)
    return torch.randn(3 * batch, dim, generator=g), [3] * batch, None, None


def test_sampler_rebuilds_teacher_forcing_input_from_ground_truth_bits():
    vae = tiny_bsq()
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        feats = vae.encode_for_raw_features(img)
    codes = BitwiseCodes(8)
    t = codes.targets(feats, BSQ_SCHEDULE)
    _, scale_bits = vae.encode(img, BSQ_SCHEDULE)
    assert all(torch.equal(a, b) for a, b in zip(t.per_scale, scale_bits, strict=True))  # the sampler's layout
    state = codes.sampler(BSQ_SCHEDULE, 2, "cpu")
    inputs = [state.step(k, None, forced=bits) for k, bits in enumerate(t.per_scale)]
    torch.testing.assert_close(torch.cat(inputs[:-1], 1), t.x_BLC_wo_prefix, atol=1e-6, rtol=0)
    assert inputs[-1] is None
    summed, _ = vae.encode(img, BSQ_SCHEDULE)
    torch.testing.assert_close(state.summed, summed, atol=1e-6, rtol=0)


def test_sampler_rebuilds_teacher_forcing_input_from_ground_truth_indices(vq):
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        feats = vq.encode_for_raw_features(img)
        codes = IndexCodes(vq)
        t = codes.targets(feats, VQ_SCHEDULE)
        idx = vq.img_to_idxBl(img)
        state = codes.sampler(VQ_SCHEDULE, 2, "cpu")
        inputs = [state.step(k, None, forced=i) for k, i in enumerate(t.per_scale)]
    assert torch.equal(t.labels, torch.cat(idx, 1))
    assert all(torch.equal(a, b) for a, b in zip(t.per_scale, idx, strict=True))
    torch.testing.assert_close(torch.cat(inputs[:-1], 1), t.x_BLC_wo_prefix, atol=1e-5, rtol=0)
    f_hat = vq.quantize.f_to_idxBl_or_fhat(feats, to_fhat=True)[-1]
    torch.testing.assert_close(state.summed, f_hat, atol=1e-5, rtol=0)


def test_vq_code_space_rejects_bit_noise_and_foreign_schedules(vq):
    feats = torch.randn(1, vq.code_dim, 4, 4)
    with pytest.raises(ValueError, match="BSQ bits only"):
        IndexCodes(vq).targets(feats, VQ_SCHEDULE, noise_strength=0.3, noise_layers=4)
    with pytest.raises(ValueError, match="patch numbers"):
        IndexCodes(vq).targets(feats, [(1, 1, 1), (1, 2, 2), (1, 4, 4)])


def train_a_few_steps(model: Infinity, codes, feats, schedule, steps: int = 25) -> tuple[float, float]:
    text = text_for(feats.shape[0])
    t = codes.targets(feats, schedule)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(steps):
        loss = codes.loss_per_token(model(text, t.x_BLC_wo_prefix, schedule), t.labels).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_tiny_infinity_learns_on_bsq_bits():
    vae = tiny_bsq()
    with torch.no_grad():
        feats = vae.encode_for_raw_features(torch.rand(4, 3, 16, 16) * 2 - 1)
    model = tiny_infinity(codebook_dim=8)
    first, last = train_a_few_steps(model, model.code_space(vae), feats, BSQ_SCHEDULE)
    assert last < 0.7 * first, (first, last)


def test_tiny_infinity_learns_on_vq_indices_and_samples_images(vq):
    with torch.no_grad():
        feats = vq.encode_for_raw_features(torch.rand(4, 3, 64, 64) * 2 - 1)
    model = tiny_infinity(codebook_dim=vq.code_dim, vocab_size=vq.quantize.vocab_size)
    codes = model.code_space(vq)
    assert (codes.token_dim, codes.head_dim) == (8, 64)
    first, last = train_a_few_steps(model, codes, feats, VQ_SCHEDULE)
    assert last < 0.7 * first, (first, last)
    model.eval()
    out = model.autoregressive_infer_cfg(
        vae=vq, scale_schedule=VQ_SCHEDULE, label_B_or_BLT=text_for(2), B=2, g_seed=0, cfg_list=2.0, top_k=10, top_p=0.9
    )
    assert [i.shape for i in out.scale_bits] == [(2, 1), (2, 4), (2, 9), (2, 16)]
    assert out.image.shape == (2, 3, 64, 64) and out.image.abs().max() <= 1
    with pytest.raises(ValueError, match="pass vae"):
        model.autoregressive_infer_cfg(scale_schedule=VQ_SCHEDULE, label_B_or_BLT=text_for(2), B=2)


def test_bsq_backend_decodes_through_the_same_protocol():
    vae = tiny_bsq()
    model = tiny_infinity(codebook_dim=8).eval()
    out = model.autoregressive_infer_cfg(
        vae=vae, scale_schedule=BSQ_SCHEDULE, label_B_or_BLT=text_for(2), B=2, g_seed=0, cfg_list=3.0, top_p=0.97
    )
    assert out.image.shape == (2, 3, 16, 16)
    summed, image = vae.decode_from_bits(out.scale_bits, BSQ_SCHEDULE)
    torch.testing.assert_close(summed, out.summed_codes, atol=1e-6, rtol=0)
    torch.testing.assert_close(image, out.image, atol=1e-5, rtol=0)


def test_sample_from_logits_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    assert (sample_from_logits(logits, top_k=1, generator=g) == 3).all()
    top2 = sample_from_logits(logits, top_k=2, generator=g)
    assert set(top2.tolist()) == {2, 3}
    # probs ~ [.03, .09, .24, .64]: top_p 0.9 removes index 0 (cumulative .03 <= .1), keeps the rest.
    nucleus = sample_from_logits(logits, top_p=0.9, generator=g)
    assert 0 not in set(nucleus.tolist()) and {1, 2, 3} <= set(nucleus.tolist())
    bits = torch.tensor([[[5.0, -5.0], [0.0, 0.01]]])  # the first bit is certain, the second a coin flip
    draws = torch.stack([sample_from_logits(bits, top_p=0.97, generator=g) for _ in range(200)])
    assert (draws[:, 0, 0] == 0).all() and 0 < draws[:, 0, 1].float().mean() < 1
