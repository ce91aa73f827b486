"""ipq_index: maximum inner product search on inner-product-aware adaptive
stochastic quantization (ASQ) codes.

    import ipq_index
    index = ipq_index.index_factory(d, "PCA,ASQ4,Rerank4")
    index.train(X)            # optionally: index.train(X, queries=sample_queries)
    index.add(X)
    scores, ids = index.search(Q, k=10)   # raw inner products, descending
"""

from . import asq
from ._numba import get_num_threads, set_num_threads
from .encoder import ASQEncoder, EncoderConfig
from .factory import index_factory, parse_spec, warmup
from .filters import AllowIds, DenyIds, IdMask
from .persistence import load
from .settings import FlatSettings, GraphSettings, IVFSettings
from .storage import FormatError
from .structures import FlatIndex

__version__ = "0.1.0"
__all__ = ["asq", "get_num_threads", "set_num_threads", "ASQEncoder", "EncoderConfig", "FlatIndex", "index_factory",
           "load", "parse_spec", "warmup", "FlatSettings", "IVFSettings", "GraphSettings", "FormatError",
           "AllowIds", "DenyIds", "IdMask", "__version__"]
