"""FeatureCache: the frozen tokenizer's features of samples seen before, looked up instead of encoded."""

from __future__ import annotations

import pytest
import torch

from scenetxtvar.training.feature_cache import FeatureCache, sample_names


class CountingEncoder:
    """A deterministic per-sample 'encoder' that counts the images it was given."""

    def __init__(self) -> None:
        self.seen = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.seen += images.shape[0]
        return images.mean(dim=1, keepdim=True) * 2 + 1


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 4, 8, generator=torch.Generator().manual_seed(seed))


def test_only_unseen_samples_are_encoded_and_the_result_equals_a_plain_encode() -> None:
    enc, cache = CountingEncoder(), FeatureCache(max_samples=16)
    images = _images(4)
    names = [("a.tar", "0"), ("a.tar", "1"), ("a.tar", "2"), ("a.tar", "3")]
    first = cache.features(enc, images, names)
    assert torch.equal(first, CountingEncoder()(images)) and enc.seen == 4
    # Next epoch, another order and one new sample: only the new one goes through the encoder.
    again = torch.cat([images[[2, 0]], _images(1, seed=5)])
    out = cache.features(enc, again, [names[2], names[0], ("b.tar", "0")])
    assert enc.seen == 5 and torch.equal(out, CountingEncoder()(again))
    assert (cache.hits, cache.misses, len(cache)) == (2, 5, 5)
    # A name twice in one batch is encoded once.
    twice = _images(2, seed=9)[[0, 0]]
    cache.features(enc, twice, [("c.tar", "7"), ("c.tar", "7")])
    assert enc.seen == 6


def test_the_cache_keeps_the_most_recent_samples_within_its_bound() -> None:
    enc, cache = CountingEncoder(), FeatureCache(max_samples=2)
    images = _images(3)
    for i in range(3):
        cache.features(enc, images[i : i + 1], [("s", str(i))])
    assert len(cache) == 2
    cache.features(enc, images[2:3], [("s", "2")])  # still there
    cache.features(enc, images[0:1], [("s", "0")])  # evicted: encoded again
    assert enc.seen == 4


def test_unnamed_samples_are_encoded_as_a_batch_and_not_cached() -> None:
    enc, cache = CountingEncoder(), FeatureCache(max_samples=8)
    batch = {"images": _images(2), "meta": [{"key": "k0", "url": "u"}, {"key": "?", "url": "u"}]}
    names = sample_names(batch)
    assert names == [("u", "k0"), None]
    out = cache.features(enc, batch["images"], names)
    assert torch.equal(out, CountingEncoder()(batch["images"])) and len(cache) == 0
    assert sample_names({"images": _images(3)}) == [None, None, None]
    with pytest.raises(ValueError, match="max_samples"):
        FeatureCache(0)
    with pytest.raises(ValueError, match="2 sample names for 3 images"):
        cache.features(enc, _images(3), names)


def test_the_shared_lru_evicts_the_least_recent_and_pickles_into_workers() -> None:
    import pickle

    from scenetxtvar.lru import LRU

    lru = LRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # "a" is now the most recent
    lru.put("c", 3)
    assert "b" not in lru and lru.get("a") == 1 and lru.get("c") == 3 and lru.get("b") is None
    again = pickle.loads(pickle.dumps(lru))
    assert len(again) == 2 and again.get("c") == 3 and again.max_items == 2
    with pytest.raises(ValueError, match="cache_decoded must be >= 1"):
        LRU(0, "cache_decoded")
