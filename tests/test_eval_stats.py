"""Streaming feature statistics equal pytorch-fid's np.mean / np.cov; stats files."""

import numpy as np
import pytest

from diffjax.eval.stats import RunningStats, load_statistics, save_statistics


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_streaming_equals_batch_statistics(offset):
    # A large common offset is where a naive sum-of-squares covariance loses digits.
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((203, 16)) @ rng.standard_normal((16, 16)) + offset
    stats = RunningStats(16)
    start = 0
    for size in [1, 0, 7, 64, 2, 100, 29]:
        stats.update(feats[start : start + size].astype(np.float32 if size == 7 else np.float64))
        start += size
    assert start == len(feats) and stats.count == len(feats)
    # The float32 batch is compared at its own precision.
    ref = feats.copy()
    ref[1:8] = ref[1:8].astype(np.float32)
    np.testing.assert_allclose(stats.mu, np.mean(ref, axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(ref, rowvar=False), rtol=1e-9, atol=1e-9)


def test_merge_equals_one_stream():
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((50, 5)) + 3.0
    parts = [RunningStats(5) for _ in range(3)]
    for p, chunk in zip(parts, (feats[:1], feats[1:20], feats[20:]), strict=True):
        p.update(chunk)
    merged = RunningStats(5)
    for p in parts + [RunningStats(5)]:  # An empty one merges as a no-op.
        merged.merge(p)
    assert merged.count == 50
    np.testing.assert_allclose(merged.mu, feats.mean(0), rtol=1e-13)
    np.testing.assert_allclose(merged.sigma, np.cov(feats, rowvar=False), rtol=1e-11)
    with pytest.raises(ValueError, match="dim"):
        merged.merge(RunningStats(4))


def test_single_batch_is_exactly_pytorch_fid():
    rng = np.random.default_rng(1)
    feats = rng.uniform(0, 5, (40, 8))
    stats = RunningStats(8)
    stats.update(feats)
    np.testing.assert_allclose(stats.mu, np.mean(feats, axis=0), rtol=1e-14)
    np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False), rtol=1e-12)
    assert stats.mu.dtype == stats.sigma.dtype == np.float64


def test_running_stats_errors():
    stats = RunningStats(4)
    with pytest.raises(ValueError, match="no features"):
        _ = stats.mu
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        stats.update(np.zeros((2, 5)))
    stats.update(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        _ = stats.sigma
    with pytest.raises(ValueError, match="NaN"):
        stats.update(np.full((2, 4), np.nan))


def test_statistics_file_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(2)
    mu, sigma = rng.standard_normal(6), np.cov(rng.standard_normal((20, 6)), rowvar=False)
    path = tmp_path / "sub" / "stats.npz"
    save_statistics(path, mu, sigma, num_images=20)
    got_mu, got_sigma = load_statistics(path)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    assert int(np.load(path)["num_images"]) == 20

    with pytest.raises(FileNotFoundError, match="fid_stats.py"):
        load_statistics(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match=r"no \['mu', 'sigma'\]"):
        load_statistics(tmp_path / "bad.npz")
    np.savez(tmp_path / "shape.npz", mu=mu, sigma=sigma[:3])
    with pytest.raises(ValueError, match="sigma"):
        load_statistics(tmp_path / "shape.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable"):
        load_statistics(tmp_path / "junk.npz")
