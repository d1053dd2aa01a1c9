"""memfast where people already train and clean data.

- ``memfast.integrations.hf``: ``MemfastTrainer``, a ``transformers.Trainer``
  whose loss is ``memfast.cross_entropy`` with a per-sequence tracker, saved
  with checkpoints and restored on resume (``pip install memfast[hf]``).
- ``memfast.integrations.lightning``: ``TrackerCallback`` for PyTorch
  Lightning (``pip install memfast[lightning]``).
- ``memfast.integrations.cleanlab``: ``label_issues``, a DataFrame in
  cleanlab's convention (needs pandas).
- ``memfast.integrations.cartography``: ``cartography_plot``, the dataset
  cartography map (needs matplotlib).

This package imports none of those frameworks; each submodule imports its own.
"""
import importlib

_LAZY = {
    "label_issues": "cleanlab",
    "otsu_threshold": "cleanlab",
    "cartography_plot": "cartography",
    "cartography_table": "cartography",
    "MemfastTrainer": "hf",
    "add_sample_ids": "hf",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
