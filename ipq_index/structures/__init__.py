"""Index structures over ASQ codes: flat scan, IVF lists and HNSW graph, on
a shared base (``IndexBase``)."""

from .base import IndexBase
from .flat import FlatIndex
from .graph import GraphIndex
from .ivf import IVFIndex

#: index classes by kind: the structure of a factory spec and the ``kind`` of a file header
KINDS = {cls.kind: cls for cls in (FlatIndex, IVFIndex, GraphIndex)}

__all__ = ["IndexBase", "FlatIndex", "IVFIndex", "GraphIndex", "KINDS"]
