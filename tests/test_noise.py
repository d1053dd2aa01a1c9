import numpy as np
import pytest
import torch

from memfast import noise


@pytest.mark.parametrize("n,k,rate", [(1000, 10, 0.1), (257, 3, 0.37), (50, 2, 1.0), (40, 5, 0.0)])
def test_symmetric_flips_exact_count_never_to_itself(n, k, rate):
    labels = np.random.default_rng(n).integers(0, k, n)
    new, mask = noise.symmetric(labels, rate, seed=3, num_classes=k)
    assert mask.dtype == bool and mask.sum() == int(rate * n)
    assert (new[mask] != labels[mask]).all()          # no flipped label maps to itself
    assert (new[~mask] == labels[~mask]).all()        # the rest are untouched
    assert new.min() >= 0 and new.max() < k
    assert (labels == np.random.default_rng(n).integers(0, k, n)).all()  # input not modified


def test_symmetric_is_uniform_over_the_other_classes():
    k = 5
    labels = np.zeros(20000, dtype=np.int64)
    new, mask = noise.symmetric(labels, 0.5, seed=0, num_classes=k)
    counts = np.bincount(new[mask], minlength=k)
    assert counts[0] == 0
    expected = mask.sum() / (k - 1)
    assert np.all(np.abs(counts[1:] - expected) < 5 * np.sqrt(expected))


def test_symmetric_torch_roundtrip_and_seed():
    labels = torch.randint(0, 10, (500,))
    a, ma = noise.symmetric(labels, 0.2, seed=7)
    b, mb = noise.symmetric(labels, 0.2, seed=7)
    c, mc = noise.symmetric(labels, 0.2, seed=8)
    assert isinstance(a, torch.Tensor) and a.dtype == labels.dtype and ma.dtype == torch.bool
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert not torch.equal(ma, mc)
    assert int(ma.sum()) == 100 and bool((a[ma] != labels[ma]).all())


def test_symmetric_bad_arguments():
    with pytest.raises(ValueError, match="rate"):
        noise.symmetric(np.array([0, 1, 2]), 1.5)
    with pytest.raises(TypeError, match="labels"):
        noise.symmetric(np.array([0.0, 1.0]), 0.5)
    with pytest.raises(ValueError, match="num_classes"):
        noise.symmetric(np.array([0, 3]), 0.5, num_classes=2)
    with pytest.raises(ValueError, match="2 classes"):
        noise.symmetric(np.array([0, 0]), 0.5)


def test_duplicates_pairs_copy_inputs_and_conflict():
    rng = np.random.default_rng(0)
    n, k, pairs_wanted = 300, 4, 25
    x = rng.normal(size=(n, 3, 2)).astype(np.float32)
    y = rng.integers(0, k, n)
    exclude = np.zeros(n, bool)
    exclude[:100] = True
    x2, y2, mask, pairs = noise.duplicates(x, y, pairs_wanted, seed=1, num_classes=k, exclude=exclude)
    assert pairs.shape == (pairs_wanted, 2) and len(np.unique(pairs)) == 2 * pairs_wanted
    assert not exclude[pairs.reshape(-1)].any()
    a, b = pairs[:, 0], pairs[:, 1]
    assert np.array_equal(x2[a], x[b]) and np.array_equal(x2[b], x[b])
    assert (y2[a] != y[b]).all() and (y2[b] == y[b]).all()
    assert mask.sum() == 2 * pairs_wanted and mask[pairs.reshape(-1)].all()
    untouched = ~mask
    assert np.array_equal(x2[untouched], x[untouched]) and np.array_equal(y2[untouched], y[untouched])


def test_duplicates_torch_and_errors():
    x, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    x2, y2, mask, pairs = noise.duplicates(x, y, 10, seed=0)
    assert isinstance(x2, torch.Tensor) and int(mask.sum()) == 20
    with pytest.raises(ValueError, match="num_pairs"):
        noise.duplicates(x, y, 11)
    with pytest.raises(ValueError, match="differ in length"):
        noise.duplicates(x[:5], y, 1)
