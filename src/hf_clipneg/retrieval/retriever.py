"""Search images by text (and texts by image) with a trained dual encoder and a faiss inner-product index.

Embeddings are the model's projected, L2-normalised features, so an inner-product index ranks by cosine
similarity. Two independent collections can be indexed: images (searched by :meth:`ClipNegRetriever.search`)
and texts (searched by :meth:`ClipNegRetriever.search_by_image`).

A ``k`` larger than the indexed collection is clamped to its size with a logged warning (a search over five
items returns at most five hits); ``k < 1`` raises.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import VisionTextDualEncoderModel, VisionTextDualEncoderProcessor

from hf_clipneg.data import to_rgb
from hf_clipneg.encoding import as_clipneg_model, encode_images, encode_texts

from .checkpoint import NotADualEncoderError, load_dual_encoder
from .faiss_index import Collection, IndexType, SearchHit, build_collection, check_k, search_collection
from .index_io import read_index, write_index
from .inputs import (
    check_batch_size,
    check_ids,
    check_target,
    check_texts,
    coerce_index_type,
    count_images,
    image_batches,
    prepare_vectors,
)

logger = logging.getLogger(__name__)


class ClipNegRetriever:
    """Embed, index and search images and texts with a `VisionTextDualEncoderModel`.

    The model is put in eval mode and moved to ``device`` (default: the model's device if it is not the
    CPU, else CUDA when available, else CPU).

    Example:
        >>> import numpy as np
        >>> from hf_clipneg.testing import build_tiny_dual_encoder
        >>> retriever = ClipNegRetriever(*build_tiny_dual_encoder(projection_dim=4), device="cpu")
        >>> retriever.index_embeddings(np.eye(4, dtype=np.float32), ids=["a", "b", "c", "d"])
        >>> [hit.id for hit in retriever.search_embeddings(np.array([[0.1, 0.9, 0.0, 0.0]]), k=2)[0]]
        ['b', 'a']
    """

    def __init__(
        self,
        model: VisionTextDualEncoderModel,
        processor: VisionTextDualEncoderProcessor,
        device: str | torch.device | None = None,
    ):
        if not isinstance(model, VisionTextDualEncoderModel):
            raise NotADualEncoderError(
                f"ClipNegRetriever needs a VisionTextDualEncoderModel, got {type(model).__name__}."
            )
        if device is None:
            model_device = next(model.parameters()).device
            if model_device.type != "cpu":
                device = model_device
            else:
                device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = as_clipneg_model(model).to(self.device).eval()
        self.processor = processor
        self._collections: dict[str, Collection | None] = {"images": None, "texts": None}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        repo_or_path: str | os.PathLike,
        device: str | torch.device | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        trust_remote_code: bool = False,
    ) -> ClipNegRetriever:
        """Load a dual encoder and its processor from a local folder or a Hub repo.

        Raises `NotADualEncoderError` (naming the checkpoint's actual model type) when the checkpoint is not a
        ``vision-text-dual-encoder``, and `OSError` with the repo and revision when it cannot be found.

        Example:
            >>> import tempfile
            >>> from hf_clipneg.testing import build_tiny_dual_encoder
            >>> model, processor = build_tiny_dual_encoder()
            >>> folder = tempfile.mkdtemp()
            >>> model.save_pretrained(folder); _ = processor.save_pretrained(folder)
            >>> ClipNegRetriever.from_pretrained(folder, device="cpu").embedding_dim
            16
        """
        model, processor = load_dual_encoder(repo_or_path, revision, token, trust_remote_code)
        return cls(model, processor, device=device)

    @property
    def embedding_dim(self) -> int:
        """Dimension of the projected embeddings (the model's ``projection_dim``)."""
        return int(self.model.config.projection_dim)

    def model_fingerprint(self) -> str:
        """A short hash of the projection weights: indexes built by a different model are detected on load."""
        digest = hashlib.sha256()
        for name in ("visual_projection", "text_projection"):
            weight = getattr(self.model, name).weight.detach().to("cpu", torch.float32).contiguous()
            digest.update(name.encode())
            digest.update(weight.numpy().tobytes())
        return digest.hexdigest()[:16]

    # ------------------------------------------------------------------ embedding
    def embed_images(
        self,
        images: Any,
        batch_size: int = 32,
        image_column: str = "image",
        show_progress: bool = True,
    ) -> np.ndarray:
        """Return the ``(N, embedding_dim)`` float32 L2-normalised image embeddings.

        ``images`` is a list of PIL images, paths, bytes or arrays (anything `hf_clipneg.data.to_rgb`
        decodes), a single image, or a `datasets.Dataset` whose ``image_column`` holds them.

        Example:
            >>> from PIL import Image
            >>> from hf_clipneg.testing import build_tiny_dual_encoder
            >>> retriever = ClipNegRetriever(*build_tiny_dual_encoder(), device="cpu")
            >>> retriever.embed_images([Image.new("RGB", (40, 30), "red")], show_progress=False).shape
            (1, 16)
        """
        check_batch_size(batch_size)
        batches = image_batches(images, batch_size, image_column)
        total = count_images(images)
        out = []
        with tqdm(total=total, desc="Embedding images", unit="img", disable=not show_progress) as bar:
            for start, values in batches:
                rgb = [to_rgb(value, row=start + i, column=image_column) for i, value in enumerate(values)]
                out.append(encode_images(self.model, self.processor.image_processor, rgb, project=True).cpu().numpy())
                bar.update(len(values))
        if not out:
            raise ValueError("No images to embed: the input is empty.")
        return np.concatenate(out).astype(np.float32, copy=False)

    def embed_texts(self, texts: str | Sequence[str], batch_size: int = 64, show_progress: bool = True) -> np.ndarray:
        """Return the ``(N, embedding_dim)`` float32 L2-normalised text embeddings (texts are cut at the model's
        `text_max_length`, as in training: `hf_clipneg.encoding.text_max_length`).

        Example:
            >>> from hf_clipneg.testing import build_tiny_dual_encoder
            >>> retriever = ClipNegRetriever(*build_tiny_dual_encoder(), device="cpu")
            >>> retriever.embed_texts(["a red circle", "a blue square"], show_progress=False).shape
            (2, 16)
        """
        check_batch_size(batch_size)
        texts = check_texts(texts)
        out = []
        with tqdm(total=len(texts), desc="Embedding texts", unit="text", disable=not show_progress) as bar:
            for start in range(0, len(texts), batch_size):
                batch = texts[start : start + batch_size]
                out.append(encode_texts(self.model, self.processor.tokenizer, batch, project=True).cpu().numpy())
                bar.update(len(batch))
        return np.concatenate(out).astype(np.float32, copy=False)

    # ------------------------------------------------------------------ indexing
    def index_images(
        self,
        images: Any,
        ids: Sequence[Hashable] | None = None,
        index_type: str | IndexType = "flat",
        nlist: int | None = None,
        nprobe: int = 8,
        batch_size: int = 32,
        image_column: str = "image",
        show_progress: bool = True,
    ) -> None:
        """Embed ``images`` and index them for text->image :meth:`search` (replaces any earlier image index).

        ``ids`` default to ``0..N-1``. ``index_type="ivf"`` trains an `IndexIVFFlat` with ``nlist`` lists
        (default about ``4 * sqrt(N)``) and searches ``nprobe`` of them.

        Example:
            >>> from PIL import Image
            >>> from hf_clipneg.testing import build_tiny_dual_encoder
            >>> retriever = ClipNegRetriever(*build_tiny_dual_encoder(), device="cpu")
            >>> retriever.index_images([Image.new("RGB", (8, 8), c) for c in ("red", "blue")], ids=["r", "b"],
            ...                        show_progress=False)
            >>> len(retriever.search(["a red photo"], k=5)[0])  # k is clamped to the 2 indexed images
            2
        """
        vectors = self.embed_images(images, batch_size=batch_size, image_column=image_column, show_progress=show_progress)
        self.index_embeddings(vectors, ids=ids, target="images", index_type=index_type, nlist=nlist, nprobe=nprobe)

    def index_texts(
        self,
        texts: Sequence[str],
        ids: Sequence[Hashable] | None = None,
        index_type: str | IndexType = "flat",
        nlist: int | None = None,
        nprobe: int = 8,
        batch_size: int = 64,
        show_progress: bool = True,
    ) -> None:
        """Embed ``texts`` and index them for image->text :meth:`search_by_image` (see :meth:`index_images`).

        Example:
            >>> from PIL import Image
            >>> from hf_clipneg.testing import build_tiny_dual_encoder
            >>> retriever = ClipNegRetriever(*build_tiny_dual_encoder(), device="cpu")
            >>> retriever.index_texts(["a red circle", "a blue square"], show_progress=False)
            >>> sorted(hit.id for hit in retriever.search_by_image([Image.new("RGB", (8, 8))], k=2)[0])
            [0, 1]
        """
        vectors = self.embed_texts(texts, batch_size=batch_size, show_progress=show_progress)
        self.index_embeddings(vectors, ids=ids, target="texts", index_type=index_type, nlist=nlist, nprobe=nprobe)

    def index_embeddings(
        self,
        vectors: np.ndarray | torch.Tensor,
        ids: Sequence[Hashable] | None = None,
        target: str = "images",
        index_type: str | IndexType = "flat",
        nlist: int | None = None,
        nprobe: int = 8,
    ) -> None:
        """Index precomputed ``(N, embedding_dim)`` vectors (L2-normalised here) as the image or text collection.

        Example:
            >>> import numpy as np
            >>> from hf_clipneg.testing import build_tiny_dual_encoder
            >>> retriever = ClipNegRetriever(*build_tiny_dual_encoder(projection_dim=2), device="cpu")
            >>> retriever.index_embeddings(np.array([[1.0, 0.0], [0.0, 1.0]]), target="texts")
            >>> retriever.indexed_size("texts")
            2
        """
        target = check_target(target)
        index_type = coerce_index_type(index_type)
        matrix = prepare_vectors(vectors, "vectors", self.embedding_dim)
        ids = check_ids(ids, len(matrix))
        self._collections[target] = build_collection(matrix, ids, index_type, nlist, nprobe, target)

    def indexed_size(self, target: str = "images") -> int:
        """Number of items in the image (or text) index; 0 when nothing is indexed."""
        collection = self._collections[check_target(target)]
        return 0 if collection is None else collection.size

    # ------------------------------------------------------------------ searching
    def search(self, texts: str | Sequence[str], k: int = 10, batch_size: int = 64) -> list[list[SearchHit]]:
        """Text->image search: for every text, the ``k`` most similar indexed images, best first.

        Example:
            >>> from PIL import Image
            >>> from hf_clipneg.testing import build_tiny_dual_encoder
            >>> retriever = ClipNegRetriever(*build_tiny_dual_encoder(), device="cpu")
            >>> retriever.index_images([Image.new("RGB", (8, 8), "red")], ids=["red.png"], show_progress=False)
            >>> retriever.search("a red photo", k=1)[0][0].id
            'red.png'
        """
        self._require("images", "index some images first with index_images(...)")
        queries = self.embed_texts(texts, batch_size=batch_size, show_progress=False)
        return self.search_embeddings(queries, k=k, target="images")

    def search_by_image(
        self, images: Any, k: int = 10, batch_size: int = 32, image_column: str = "image"
    ) -> list[list[SearchHit]]:
        """Image->text search against the texts indexed with :meth:`index_texts`.

        Example:
            >>> from PIL import Image
            >>> from hf_clipneg.testing import build_tiny_dual_encoder
            >>> retriever = ClipNegRetriever(*build_tiny_dual_encoder(), device="cpu")
            >>> retriever.index_texts(["a red circle"], ids=["cap-1"], show_progress=False)
            >>> retriever.search_by_image(Image.new("RGB", (8, 8)), k=1)[0][0].id
            'cap-1'
        """
        self._require("texts", "index some texts first with index_texts(...)")
        queries = self.embed_images(images, batch_size=batch_size, image_column=image_column, show_progress=False)
        return self.search_embeddings(queries, k=k, target="texts")

    def search_embeddings(
        self, queries: np.ndarray | torch.Tensor, k: int = 10, target: str = "images"
    ) -> list[list[SearchHit]]:
        """Search the image (or text) index with precomputed ``(Q, embedding_dim)`` query vectors.

        Example:
            >>> import numpy as np
            >>> from hf_clipneg.testing import build_tiny_dual_encoder
            >>> retriever = ClipNegRetriever(*build_tiny_dual_encoder(projection_dim=2), device="cpu")
            >>> retriever.index_embeddings(np.array([[1.0, 0.0], [0.0, 1.0]]), ids=["x", "y"])
            >>> hit = retriever.search_embeddings(np.array([[0.0, 2.0]]), k=1)[0][0]
            >>> hit.id, round(hit.score, 3), hit.rank
            ('y', 1.0, 1)
        """
        target = check_target(target)
        hint = "index some images first with index_images(...)" if target == "images" else (
            "index some texts first with index_texts(...)"
        )
        collection = self._require(target, hint)
        k = check_k(k, collection, target)
        return search_collection(collection, prepare_vectors(queries, "queries", self.embedding_dim), k)

    # ------------------------------------------------------------------ persistence
    def save_index(self, path: str | os.PathLike, target: str = "images") -> None:
        """Write the image (or text) index to ``path`` (faiss format) and ``path + ".json"`` (ids and metadata).

        Example:
            >>> import os, tempfile, numpy as np
            >>> from hf_clipneg.testing import build_tiny_dual_encoder
            >>> retriever = ClipNegRetriever(*build_tiny_dual_encoder(projection_dim=2), device="cpu")
            >>> retriever.index_embeddings(np.array([[1.0, 0.0], [0.0, 1.0]]), ids=["x", "y"])
            >>> path = os.path.join(tempfile.mkdtemp(), "images.faiss")
            >>> retriever.save_index(path)
            >>> retriever.load_index(path); retriever.indexed_size()
            2
        """
        target = check_target(target)
        collection = self._require(target, f"index some {target} first with index_{target}(...)")
        name_or_path = getattr(self.model.config, "_name_or_path", None) or None
        write_index(collection, path, target, self.model_fingerprint(), name_or_path)

    def load_index(self, path: str | os.PathLike, target: str | None = None) -> None:
        """Load an index written by :meth:`save_index` (as the collection it was saved as, unless ``target``).

        Refuses files that are not faiss indexes of the kinds this class writes, a missing or inconsistent
        JSON sidecar, and an embedding dimension different from the model's. An index built by a model with
        different projection weights only warns (its scores are then not comparable with this model's queries).

        The file's structure is checked before faiss reads it: only an inner-product ``IndexFlatIP`` or an
        ``IndexIVFFlat`` over a flat inner-product quantizer is accepted, and every size the file declares
        must match the bytes it holds (a small crafted file cannot make it allocate gigabytes). The sidecar's
        ids must be unique strings or integers, one per vector.
        """
        target, collection = read_index(path, self.embedding_dim, self.model_fingerprint(), target)
        self._collections[target] = collection

    # ------------------------------------------------------------------ helpers
    def _require(self, target: str, hint: str) -> Collection:
        collection = self._collections[target]
        if collection is None or collection.size == 0:
            raise RuntimeError(f"The {target} index is empty: {hint}.")
        return collection


__all__ = ["ClipNegRetriever"]
