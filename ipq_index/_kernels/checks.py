"""Input checks that run on every search call (a numpy ``isfinite(...).all()``
costs ~3 us for a single query row and allocates a boolean copy of large
inputs)."""

from __future__ import annotations

import numpy as np

from .._numba import kernel


@kernel
def all_finite(X):
    """True when no entry of the 2-D float array X is NaN or infinite."""
    for i in range(X.shape[0]):
        for j in range(X.shape[1]):
            v = X[i, j]
            if not np.isfinite(v):
                return False
    return True
