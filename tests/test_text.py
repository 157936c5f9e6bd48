"""Text encoders and the packed (official Infinity) text format; everything is built offline."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch

from scenetxtvar.text import (
    CachedTextEncoder,
    PackedText,
    T5TextEncoder,
    TextEncoder,
    TinyTextEncoder,
    as_packed_text,
    pack_text,
)
from scenetxtvar.training.builders import build_text_encoder

PROMPTS = ['a shop sign that reads "OPEN"', "", "héllo wörld", "a red stop sign"]


@pytest.fixture(scope="module")
def tiny() -> TinyTextEncoder:
    """One small encoder shared by the read-only tests."""
    return TinyTextEncoder(dim=64, num_layers=2, num_heads=4, max_length=32, seed=0)


def _rows(packed: PackedText, i: int) -> torch.Tensor:
    """Feature rows of prompt ``i``."""
    cu = packed.cu_seqlens_k
    return packed.kv_compact[int(cu[i]) : int(cu[i + 1])]


# ---------------------------------------------------------------------------------------------- packing


def test_pack_text_matches_official_layout() -> None:
    feats = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    packed = pack_text(feats, mask)
    assert packed.lens.dtype == torch.int64 and packed.lens.tolist() == [3, 5, 1]
    assert packed.cu_seqlens_k.dtype == torch.int32 and packed.cu_seqlens_k.tolist() == [0, 3, 8, 9]
    assert packed.max_seqlen_k == 5 and isinstance(packed.max_seqlen_k, int)
    assert packed.kv_compact.shape == (9, 8) and packed.batch_size == 3
    for i, n in enumerate([3, 5, 1]):
        assert torch.equal(_rows(packed, i), feats[i, :n])


def test_pack_text_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="attention_mask"):
        pack_text(torch.randn(2, 4, 8), torch.ones(2, 5))


@pytest.mark.parametrize(
    ("label", "match"),
    [
        ((torch.randn(4, 8), [2, 3], None, None), "rows but lens sum to 5"),
        ((torch.randn(2, 8), [2, 0], None, None), "at least one token"),
        ((torch.randn(0, 8), [], None, None), "at least one token"),
        ((torch.randn(2, 3, 8), [2], None, None), "2-D tensor"),
        ((torch.randn(2, 8), [2], None), "sequence of 3 items"),
    ],
)
def test_as_packed_text_validation(label: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        as_packed_text(label)


def test_as_packed_text_recomputes_cu_and_max() -> None:
    packed = as_packed_text((torch.randn(6, 4), [1, 5], None, None))
    assert packed.cu_seqlens_k.tolist() == [0, 1, 6] and packed.max_seqlen_k == 5


# ---------------------------------------------------------------------------------------------- tiny


def test_tiny_encoder_output_format(tiny: TinyTextEncoder) -> None:
    packed = tiny.encode(PROMPTS)
    expected = [len(p.encode("utf-8")) + 1 for p in PROMPTS]  # bytes + EOS
    assert isinstance(tiny, TextEncoder)
    assert packed.lens.tolist() == expected and packed.lens.dtype == torch.int64
    assert packed.cu_seqlens_k.dtype == torch.int32
    assert packed.cu_seqlens_k.tolist() == [0, *torch.tensor(expected).cumsum(0).tolist()]
    assert packed.max_seqlen_k == max(expected)
    assert packed.kv_compact.shape == (sum(expected), tiny.dim) and packed.kv_compact.dtype == torch.float32
    assert torch.isfinite(packed.kv_compact).all()
    assert packed.lens[1] == 1  # the empty prompt keeps its EOS
    assert torch.equal(tiny(PROMPTS).kv_compact, packed.kv_compact)  # __call__ == encode


def test_tiny_encoder_is_seeded_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    a = TinyTextEncoder(dim=64, max_length=32, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = TinyTextEncoder(dim=64, max_length=32, seed=7)
    c = TinyTextEncoder(dim=64, max_length=32, seed=8)
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), na
    fa, fb, fc = (e.encode(PROMPTS).kv_compact for e in (a, b, c))
    assert torch.equal(fa, fb)
    assert not torch.allclose(fa, fc)


def test_tiny_encoder_distinguishes_prompts(tiny: TinyTextEncoder) -> None:
    packed = tiny.encode(["a red stop sign", "a red stoP sign"])
    assert not torch.allclose(_rows(packed, 0), _rows(packed, 1))


def test_tiny_encoder_padding_does_not_leak(tiny: TinyTextEncoder) -> None:
    alone = tiny.encode(["short"]).kv_compact
    batched = tiny.encode(["a much longer prompt than the first one", "short"])
    torch.testing.assert_close(_rows(batched, 1), alone, atol=1e-5, rtol=0)


def test_tiny_encoder_truncates_to_max_length() -> None:
    enc = TinyTextEncoder(dim=32, num_heads=2, max_length=8)
    packed = enc.encode(["x" * 100, "abc"])
    assert packed.lens.tolist() == [8, 4] and packed.max_seqlen_k == 8
    assert enc.tokenizer.ids("x" * 100)[-1] == enc.tokenizer.eos_id  # EOS survives truncation


def test_tiny_encoder_is_frozen_but_features_feed_training(tiny: TinyTextEncoder) -> None:
    tiny.train()
    assert not tiny.model.training
    assert not any(p.requires_grad for p in tiny.parameters())
    feats = tiny.encode(["abc"]).kv_compact
    assert not feats.requires_grad
    proj = torch.nn.Linear(tiny.dim, 3)
    proj(feats).sum().backward()  # would fail on inference-mode tensors
    assert proj.weight.grad is not None


@pytest.mark.parametrize(
    ("prompts", "error", "match"),
    [([], ValueError, "non-empty"), ("abc", TypeError, "single str"), ([b"abc"], TypeError, "bytes")],
)
def test_encoder_rejects_bad_prompts(tiny: TinyTextEncoder, prompts: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        tiny.encode(prompts)  # type: ignore[arg-type]


class _CountingEncoder(torch.nn.Module):
    """The tiny encoder, recording the prompts it is asked to encode."""

    def __init__(self, inner: TinyTextEncoder) -> None:
        super().__init__()
        self.inner, self.dim, self.max_length, self.calls = inner, inner.dim, inner.max_length, []

    def encode(self, prompts):
        self.calls.append(list(prompts))
        return self.inner.encode(prompts)


def test_cached_encoder_matches_the_encoder_and_encodes_each_prompt_once(tiny: TinyTextEncoder) -> None:
    counting = _CountingEncoder(tiny)
    cached = CachedTextEncoder(counting, max_prompts=8)
    first = cached.encode(PROMPTS)
    again = cached.encode([PROMPTS[2], "new one", PROMPTS[0], PROMPTS[2]])
    assert counting.calls == [PROMPTS, ["new one"]]  # repeats inside a batch encoded once too
    assert (cached.hits, cached.misses) == (3 + 0, 4 + 1)
    ref = tiny.encode(PROMPTS)
    assert torch.equal(first.lens, ref.lens) and torch.equal(first.cu_seqlens_k, ref.cu_seqlens_k)
    torch.testing.assert_close(first.kv_compact, ref.kv_compact, atol=1e-5, rtol=0)
    want = tiny.encode([PROMPTS[2], "new one", PROMPTS[0], PROMPTS[2]])
    assert torch.equal(again.lens, want.lens) and again.max_seqlen_k == want.max_seqlen_k
    torch.testing.assert_close(again.kv_compact, want.kv_compact, atol=1e-5, rtol=0)


def test_cached_encoder_keeps_the_most_recent_prompts(tiny: TinyTextEncoder) -> None:
    counting = _CountingEncoder(tiny)
    cached = CachedTextEncoder(counting, max_prompts=2)
    cached.encode(["a", "b"])
    cached.encode(["a"])  # "a" is now the most recent, so "c" evicts "b"
    cached.encode(["c"])
    cached.encode(["a", "b"])
    assert counting.calls == [["a", "b"], ["c"], ["b"]]
    big = cached.encode(["x", "y", "z"])  # more new prompts than the bound still come back whole
    assert big.batch_size == 3 and len(cached._rows) == 2


def test_cached_encoder_forgets_on_device_or_dtype_moves(tiny: TinyTextEncoder) -> None:
    counting = _CountingEncoder(TinyTextEncoder(dim=32, num_heads=2, max_length=16))
    cached = CachedTextEncoder(counting, max_prompts=4)
    cached.encode(["a"])
    cached.to("cpu")  # where it already is (generate() does this every call)
    cached.encode(["a"])
    cached.double()
    cached.encode(["a"])
    assert counting.calls == [["a"], ["a"]]
    cached.train()
    assert not cached.training and not counting.inner.model.training
    with pytest.raises(ValueError, match="max_prompts"):
        CachedTextEncoder(counting, max_prompts=0)


def test_build_text_encoder() -> None:
    enc = build_text_encoder("tiny", dim=32, num_heads=2, seed=3)
    assert isinstance(enc, TinyTextEncoder) and enc.dim == 32
    cached = build_text_encoder("tiny", dim=32, num_heads=2, cache_prompts=5)
    assert isinstance(cached, CachedTextEncoder) and cached.max_prompts == 5 and cached.dim == 32
    with pytest.raises(ValueError, match="text.kind must be"):
        build_text_encoder("clip")


# ---------------------------------------------------------------------------------------------- T5


def _save_tokenizer(path: Path, kind: str) -> None:
    """Save a file-free tokenizer: a small real T5 (Unigram) one from an in-memory vocab, or ByT5's."""
    from transformers import ByT5Tokenizer, T5Tokenizer

    if kind == "byt5":
        ByT5Tokenizer().save_pretrained(path)
        return
    pieces = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in pieces] + [("\u2581" + w, -1.0) for w in ("a", "the", "sign")]
    try:  # transformers >= 5 builds a Unigram T5 tokenizer from a vocab list
        tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    except (TypeError, ValueError, OSError):  # transformers 4 needs a sentencepiece file
        pytest.skip("this transformers cannot build a T5 tokenizer without a sentencepiece file")
    tok.save_pretrained(path)


@pytest.fixture(scope="module", params=["t5", "byt5"])
def t5_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding a tiny random T5 encoder and a tokenizer, like a flan-t5-xl download."""
    from transformers import T5Config, T5EncoderModel

    path = tmp_path_factory.mktemp(f"flan-t5-tiny-{request.param}")
    _save_tokenizer(path, request.param)
    config = T5Config(
        vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", dropout_rate=0.0,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        T5EncoderModel(config).save_pretrained(path)
    return path


def test_t5_encoder_round_trip(t5_dir: Path) -> None:
    from transformers import AutoTokenizer, T5EncoderModel

    enc = T5TextEncoder(t5_dir, max_length=16, dtype="fp32")
    assert enc.dim == 32 and isinstance(enc, TextEncoder)
    assert not enc.model.training and not any(p.requires_grad for p in enc.parameters())
    prompts = ["a sign", "", "the quick brown fox jumps over the lazy dog"]
    packed = enc(prompts)

    tok = AutoTokenizer.from_pretrained(t5_dir, legacy=True)
    assert type(tok) is type(enc.tokenizer)
    model = T5EncoderModel.from_pretrained(t5_dir).eval()
    ref = tok(prompts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**ref).last_hidden_state
    lens = ref["attention_mask"].sum(1)
    assert packed.lens.tolist() == lens.tolist() and packed.lens[1] == 1 and packed.max_seqlen_k == 16
    for i, n in enumerate(lens.tolist()):
        torch.testing.assert_close(_rows(packed, i), hidden[i, :n], atol=1e-5, rtol=1e-5)


def test_t5_encoder_half_precision_gives_fp32_features(t5_dir: Path) -> None:
    packed = build_text_encoder("t5", path=t5_dir, max_length=8, dtype="bf16").encode(["a sign"])
    assert packed.kv_compact.dtype == torch.float32 and torch.isfinite(packed.kv_compact).all()


def test_t5_encoder_missing_or_incomplete_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"nope.*google/flan-t5-xl.*text\.path"):
        T5TextEncoder(missing)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no model weights"):
        T5TextEncoder(tmp_path)
    with pytest.raises(ValueError, match="dtype must be one of"):
        T5TextEncoder(tmp_path, dtype="fp8")
