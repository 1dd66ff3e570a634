"""Search images by text (and texts by image) with a trained dual encoder and a faiss inner-product index.

The modules:

- `retriever`: `ClipNegRetriever`, embedding, indexing and searching with one model.
- `checkpoint`: loading that model (`NotADualEncoderError` for checkpoints of another kind).
- `faiss_index`: building and searching one faiss index (`IndexType`, `SearchHit`), GPU placement.
- `index_io`: saving an index with its JSON sidecar, and loading one only after checking both files.
- `faiss_file`: the structure check of a faiss file, before faiss parses it.
- `inputs`: checks of targets, ids, texts and vectors; batching of image inputs.

Example:
    >>> import numpy as np
    >>> from hf_clipneg.retrieval import ClipNegRetriever
    >>> from hf_clipneg.testing import build_tiny_dual_encoder
    >>> retriever = ClipNegRetriever(*build_tiny_dual_encoder(projection_dim=2), device="cpu")
    >>> retriever.index_embeddings(np.eye(2), ids=["cat", "dog"])
    >>> retriever.search_embeddings(np.array([[0.2, 1.0]]), k=1)[0][0].id
    'dog'
"""

from __future__ import annotations

from .checkpoint import DUAL_ENCODER_MODEL_TYPE, NotADualEncoderError
from .faiss_index import IndexType, SearchHit
from .index_io import SIDECAR_FORMAT, SIDECAR_VERSION
from .retriever import ClipNegRetriever

__all__ = [
    "ClipNegRetriever",
    "IndexType",
    "SearchHit",
    "NotADualEncoderError",
    "DUAL_ENCODER_MODEL_TYPE",
    "SIDECAR_FORMAT",
    "SIDECAR_VERSION",
]
