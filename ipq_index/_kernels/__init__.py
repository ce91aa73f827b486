"""Pure numba kernels (no classes, no Python objects); see ipq_index._numba."""
