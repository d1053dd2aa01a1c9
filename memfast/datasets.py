"""Small synthetic and embedded data sets for the demos and tests (no downloads).

- :func:`spurious_features`: the MAT paper's interpretable setup (Setup 2.1):
  a core feature, a scaled spurious feature that agrees with the label for
  most training samples, and many Gaussian noise features that let a linear
  model memorise the exceptions.
- :func:`colored_digits`: ColoredMNIST-like data built from scikit-learn's
  embedded 8×8 digits: label = digit ≥ 5, a colour channel that agrees with
  the label for most training samples.

Both return a :class:`GroupData` whose ``minority`` marks the samples whose
spurious attribute disagrees with the label; ``groups`` = 2·y + minority.
"""
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["GroupData", "spurious_features", "colored_digits"]


class GroupData(NamedTuple):
    x: Tensor          # [n, ...] float32 inputs
    y: Tensor          # [n] long labels in {0, 1}
    attribute: Tensor  # [n] long spurious attribute in {0, 1}
    minority: Tensor   # [n] bool: attribute != y

    @property
    def groups(self) -> Tensor:
        """Group index 2·y + minority (the XRM/MAT papers' num_m·y + a layout)."""
        return 2 * self.y + self.minority.long()

    def __len__(self):
        return self.y.shape[0]


def _exact_fraction_mask(n, fraction, gen):
    """A mask with exactly int(fraction·n) True entries at random positions."""
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"minority_fraction must be in [0, 1], got {fraction}")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=gen)[:int(fraction * n)]] = True
    return mask


def spurious_features(n: int = 1000, dim: int = 1800, *, minority_fraction: float = 0.1, noise_std: float = 0.5,
                      core_std: float = 0.12, spurious_scale: float = 5.0, seed: int = 0) -> GroupData:
    """The MAT paper's Setup 2.1 with its official code's parameters.

    x = (x_y, γ·x_a, ε) ∈ R^dim with y ~ Bernoulli(0.5), x_y = s_y·N(1, core_std²),
    x_a = s_a·N(1, core_std²), s = 2·label − 1, γ = ``spurious_scale``;
    a = y except on exactly ``int(minority_fraction·n)`` random samples, where
    a = 1 − y (0.1 for training, 0.5 for test); ε ~ N(0, noise_std²·I) on the
    other dim − 2 coordinates (noise_std = 0: the noiseless case).
    """
    if n < 1 or dim < 2:
        raise ValueError(f"need n >= 1 and dim >= 2, got n={n}, dim={dim}")
    if noise_std < 0 or core_std < 0:
        raise ValueError("noise_std and core_std must be non-negative")
    gen = torch.Generator().manual_seed(int(seed))
    y = (torch.rand(n, generator=gen) < 0.5).long()
    minority = _exact_fraction_mask(n, minority_fraction, gen)
    attribute = torch.where(minority, 1 - y, y)
    core = (2 * y - 1).float() * (1.0 + core_std * torch.randn(n, generator=gen))
    spurious = (2 * attribute - 1).float() * (1.0 + core_std * torch.randn(n, generator=gen))
    noise = noise_std * torch.randn(n, dim - 2, generator=gen)
    x = torch.cat([core[:, None], spurious_scale * spurious[:, None], noise], 1)
    return GroupData(x, y, attribute, minority)


def colored_digits(split: str = "train", *, minority_fraction=None, test_fraction: float = 0.33,
                   label_noise: float = 0.0, seed: int = 0) -> GroupData:
    """ColoredMNIST in miniature from ``sklearn.datasets.load_digits`` (1797
    8×8 images, embedded in scikit-learn; no download).

    Label y = 1[digit ≥ 5]. Each image becomes 2 colour channels [2, 8, 8]
    (pixel values / 16): the digit is drawn in channel ``attribute`` and the
    other channel is 0. The colour agrees with the label except on exactly
    ``int(minority_fraction·n)`` random samples (default 0.1 for "train",
    0.5 for "test"). ``label_noise`` flips that fraction of the labels after
    the colour is assigned (ColoredMNIST uses 0.25; 0 keeps the shape fully
    predictive). The train/test partition of the 1797 images is fixed by
    ``seed``; the colours of each split are drawn with their own stream.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if minority_fraction is None:
        minority_fraction = 0.1 if split == "train" else 0.5
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    digit = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(digit), generator=torch.Generator().manual_seed(int(seed)))
    n_test = int(round(test_fraction * len(digit)))
    rows = perm[n_test:] if split == "train" else perm[:n_test]
    images, digit = images[rows], digit[rows]
    n = len(rows)
    gen = torch.Generator().manual_seed(int(seed) * 2 + (1 if split == "train" else 2) + 1000)
    y = (digit >= 5).long()
    minority = _exact_fraction_mask(n, minority_fraction, gen)
    attribute = torch.where(minority, 1 - y, y)
    if label_noise:
        y = torch.where(_exact_fraction_mask(n, label_noise, gen), 1 - y, y)
        minority = attribute != y
    x = torch.zeros(n, 2, 8, 8)
    x[torch.arange(n), attribute] = images
    return GroupData(x, y, attribute, minority)
