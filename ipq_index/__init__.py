"""ipq_index: maximum inner product search on inner-product-aware adaptive
stochastic quantization (ASQ) codes."""

from . import asq
from ._numba import set_num_threads

__version__ = "0.1.0"
__all__ = ["asq", "set_num_threads", "__version__"]
