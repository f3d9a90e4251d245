"""Repeat-factor sampling of rare classes (``data.rare_repeat``), after LVIS (Gupta et al. 2019).

Class weights scale the loss of the pixels a batch happens to hold; a class found in 5 % of the
images is simply absent from most batches, and the model forgets it between sightings. Repeat
factors show such images more often instead: with ``f_c`` the fraction of training images
holding class c and ``t`` the threshold,

    r_c = max(1, sqrt(t / f_c)),    r_i = max over the classes c in image i of r_c,

and image i appears ``r_i`` times per epoch (the fraction by a seeded stochastic rounding, drawn
once, so every rank, every epoch and a resumed run see the same list). Classes in at least a
fraction ``t`` of the images change nothing; the ignore index never counts.

Example:
    >>> presence = np.array([[1, 0], [1, 0], [1, 0], [1, 1]], dtype=bool)  # class 1: 1 image in 4
    >>> repeat_factors(presence, threshold=1.0).round(3).tolist()
    [1.0, 1.0, 1.0, 2.0]
    >>> repeated_indices(np.array([1.0, 1.0, 1.0, 2.0]), seed=0)
    [0, 1, 2, 3, 3]
"""

from __future__ import annotations

import numpy as np


def repeat_factors(presence: np.ndarray, threshold: float) -> np.ndarray:
    """``r_i`` per image from an ``(images, classes)`` boolean presence matrix."""
    if not 0 < threshold <= 1:
        raise ValueError(f"data.rare_repeat: a fraction of images in (0, 1], got {threshold}")
    presence = np.asarray(presence, dtype=bool)
    if presence.ndim != 2 or presence.shape[0] == 0:
        raise ValueError(f"expected an (images, classes) presence matrix, got {presence.shape}")
    fraction = presence.mean(axis=0)
    per_class = np.ones(presence.shape[1])
    seen = fraction > 0
    per_class[seen] = np.maximum(1.0, np.sqrt(threshold / fraction[seen]))
    return np.where(presence, per_class, 1.0).max(axis=1)


def repeated_indices(factors: np.ndarray, seed: int) -> list[int]:
    """Each index ``floor(r_i)`` times, plus once more with probability ``r_i - floor(r_i)``."""
    rng = np.random.default_rng(seed)
    whole = np.floor(factors).astype(np.int64)
    counts = whole + (rng.random(len(factors)) < factors - whole)
    return np.repeat(np.arange(len(factors)), counts).tolist()
