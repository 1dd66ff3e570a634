"""Search images by text (and texts by image) with a trained dual encoder and a faiss inner-product index.

Embeddings are the model's projected, L2-normalised features, so an inner-product index ranks by cosine
similarity. Two independent collections can be indexed: images (searched by :meth:`ClipNegRetriever.search`)
and texts (searched by :meth:`ClipNegRetriever.search_by_image`).

A ``k`` larger than the indexed collection is clamped to its size with a logged warning (a search over five
items returns at most five hits); ``k < 1`` raises.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import json
import logging
import math
import os
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import (
    PretrainedConfig,
    VisionTextDualEncoderModel,
    VisionTextDualEncoderProcessor,
)

from hf_clipneg._atomic import atomic_files
from hf_clipneg._faiss import faiss_gpu_count, import_faiss
from hf_clipneg.encoding import as_clipneg_model, encode_images, encode_texts
from hf_clipneg.data import to_rgb, without_image_decoding
from hf_clipneg.modeling import ClipNegDualEncoderModel

logger = logging.getLogger(__name__)

DUAL_ENCODER_MODEL_TYPE = "vision-text-dual-encoder"
SIDECAR_FORMAT = "hf_clipneg-faiss-index"
SIDECAR_VERSION = 1
# The first four bytes faiss writes for the index types this module builds (IndexFlatIP, IndexIVFFlat;
# "IvFl" is the IVF tag of older faiss releases). Anything else is refused before faiss parses it.
_FAISS_FOURCC = {b"IxFI": "flat", b"IwFl": "ivf", b"IvFl": "ivf"}
_MIN_FAISS_FILE_BYTES = 32
_MAX_INDEX_DIM = 1 << 16  # far above any embedding size; a larger declared dimension is a corrupt header
# faiss GPU indexes cannot return more than this many neighbours per query.
_FAISS_GPU_MAX_K = 2048

__all__ = ["ClipNegRetriever", "IndexType", "SearchHit", "NotADualEncoderError"]


class NotADualEncoderError(ValueError):
    """The checkpoint exists but is not a `VisionTextDualEncoderModel`."""


class IndexType(str, enum.Enum):
    """faiss index kinds: exact search (``flat``) or inverted lists (``ivf``, approximate, faster on large sets)."""

    FLAT = "flat"
    IVF = "ivf"


@dataclass(frozen=True)
class SearchHit:
    """One search result: the indexed item's id, its cosine similarity to the query, and its 1-based rank."""

    id: Hashable
    score: float
    rank: int

    def to_dict(self) -> dict[str, Any]:
        """`{"rank", "id", "score"}`, JSON-ready (numpy scalars become Python numbers).

        Example:
            >>> SearchHit(id=3, score=0.5, rank=1).to_dict()
            {'rank': 1, 'id': 3, 'score': 0.5}
        """
        item = self.id.item() if hasattr(self.id, "item") else self.id
        return {"rank": int(self.rank), "id": item, "score": float(self.score)}


class _Collection:
    """A faiss index plus the ids of its rows."""

    def __init__(self, index: Any, ids: list[Hashable], index_type: IndexType, nlist: int | None, nprobe: int | None):
        self.index = index
        self.ids = ids
        self.index_type = index_type
        self.nlist = nlist
        self.nprobe = nprobe

    @property
    def size(self) -> int:
        return len(self.ids)


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
        self._collections: dict[str, _Collection | None] = {"images": None, "texts": None}

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
        source = os.fspath(repo_or_path)
        hub_kwargs: dict[str, Any] = {"revision": revision, "token": token}
        if trust_remote_code:  # forwarded only when the user asked for it
            hub_kwargs["trust_remote_code"] = True
        where = f"{source!r}" + (f" at revision {revision!r}" if revision else "")
        looks_local = os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1
        if looks_local and not os.path.isdir(os.path.expanduser(source)):
            raise FileNotFoundError(
                f"The local checkpoint folder {source!r} does not exist. Pass the folder written by "
                "save_pretrained (holding config.json), or a Hub repo id such as 'namespace/name'."
            )
        source = os.path.expanduser(source)
        try:
            config_dict, _ = PretrainedConfig.get_config_dict(source, revision=revision, token=token)
        except OSError as err:
            raise OSError(
                f"Cannot load a model config from {where}: {err}\nCheck that the local folder exists and holds a "
                "config.json, or that the Hub repo id, the revision (branch, tag or commit) and your token are right."
            ) from err
        model_type = config_dict.get("model_type")
        if model_type != DUAL_ENCODER_MODEL_TYPE:
            architectures = config_dict.get("architectures") or []
            raise NotADualEncoderError(
                f"{where} is a {model_type!r} checkpoint (architectures: {architectures or 'unknown'}), not a "
                f"{DUAL_ENCODER_MODEL_TYPE!r} one. ClipNegRetriever needs a VisionTextDualEncoderModel: one trained with "
                "hf_clipneg, or one built with VisionTextDualEncoderModel.from_vision_text_pretrained(vision, text)."
            )
        try:
            model = ClipNegDualEncoderModel.from_pretrained(source, **hub_kwargs)
            processor = VisionTextDualEncoderProcessor.from_pretrained(source, **hub_kwargs)
        except OSError as err:
            raise OSError(
                f"Found a dual-encoder config in {where} but could not load its weights or processor: {err}\n"
                "A checkpoint needs the model weights plus the tokenizer and image processor files "
                "(save both with model.save_pretrained(folder) and processor.save_pretrained(folder))."
            ) from err
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
        _check_batch_size(batch_size)
        batches = _image_batches(images, batch_size, image_column)
        total = _count(images)
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
        _check_batch_size(batch_size)
        texts = _check_texts(texts)
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
        target = _check_target(target)
        index_type = _coerce_index_type(index_type)
        matrix = self._prepare_vectors(vectors, "vectors")
        n = len(matrix)
        ids = _check_ids(ids, n)
        faiss = import_faiss()
        dim = matrix.shape[1]
        if index_type is IndexType.FLAT:
            index = faiss.IndexFlatIP(dim)
            nlist = nprobe = None
        else:
            if nlist is None:
                nlist = max(1, min(n, int(round(4 * math.sqrt(n)))))
            if not isinstance(nlist, int) or not 1 <= nlist <= n:
                raise ValueError(
                    f"nlist must be an integer between 1 and the number of vectors ({n}) for an IVF index, got {nlist!r}."
                )
            if not isinstance(nprobe, int) or nprobe < 1:
                raise ValueError(f"nprobe must be a positive integer, got {nprobe!r}.")
            if n < 39 * nlist:
                logger.info(
                    "Training IVF with %d lists on only %d vectors (faiss suggests at least %d); recall may suffer.",
                    nlist, n, 39 * nlist,
                )
            nprobe = min(nprobe, nlist)
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.min_points_per_centroid = 1  # we log the small-training-set note ourselves (faiss prints to stderr)
            index.train(matrix)
            index.nprobe = nprobe
        index.add(matrix)
        index = _maybe_to_gpu(index)
        self._collections[target] = _Collection(index, ids, index_type, nlist, nprobe)
        logger.info("Indexed %d %s in a %s faiss index (dim %d).", n, target, index_type.value, dim)

    def indexed_size(self, target: str = "images") -> int:
        """Number of items in the image (or text) index; 0 when nothing is indexed."""
        collection = self._collections[_check_target(target)]
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
        target = _check_target(target)
        hint = "index some images first with index_images(...)" if target == "images" else (
            "index some texts first with index_texts(...)"
        )
        collection = self._require(target, hint)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        k = int(k)
        if k > collection.size:
            logger.warning(
                "k=%d is larger than the %d indexed %s; returning at most %d hits per query.",
                k, collection.size, target, collection.size,
            )
            k = collection.size
        if k > _FAISS_GPU_MAX_K and _is_gpu_index(collection.index):
            raise ValueError(f"faiss GPU indexes return at most {_FAISS_GPU_MAX_K} neighbours per query; got k={k}.")
        matrix = self._prepare_vectors(queries, "queries")
        scores, labels = collection.index.search(matrix, k)
        results: list[list[SearchHit]] = []
        short = 0
        for row_scores, row_labels in zip(scores, labels):
            hits = [
                SearchHit(id=collection.ids[int(label)], score=float(score), rank=rank)
                for rank, (score, label) in enumerate(
                    ((s, l) for s, l in zip(row_scores, row_labels) if l >= 0), start=1
                )
            ]
            short += len(hits) < k
            results.append(hits)
        if short:
            logger.warning(
                "%d of %d queries got fewer than k=%d hits: the %d probed IVF lists held too few items. "
                "Raise nprobe (index_*(..., nprobe=...)) for fuller results.",
                short, len(results), k, collection.nprobe or 0,
            )
        return results

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
        target = _check_target(target)
        collection = self._require(target, f"index some {target} first with index_{target}(...)")
        faiss = import_faiss()
        path = os.fspath(path)
        for row, item_id in enumerate(collection.ids):
            if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
                raise TypeError(
                    f"id row {row} is a {type(item_id).__name__}; only str and int ids can be saved to the JSON sidecar."
                )
        index = collection.index
        if _is_gpu_index(index):
            index = faiss.index_gpu_to_cpu(index)
        sidecar = {
            "format": SIDECAR_FORMAT,
            "version": SIDECAR_VERSION,
            "target": target,
            "index_type": collection.index_type.value,
            "nlist": collection.nlist,
            "nprobe": collection.nprobe,
            "dim": int(index.d),
            "ntotal": int(index.ntotal),
            "model_fingerprint": self.model_fingerprint(),
            "model_name_or_path": getattr(self.model.config, "_name_or_path", None) or None,
            "ids": collection.ids,
        }
        # Both files are written completely beside their targets before either replaces an earlier pair.
        with atomic_files(path, path + ".json") as (index_tmp, sidecar_tmp):
            try:
                faiss.write_index(index, index_tmp)
            except RuntimeError as err:  # faiss reports write errors (a full disk...) as RuntimeError
                code = errno.ENOSPC if "No space left" in str(err) else errno.EIO
                raise OSError(
                    code, f"Could not write the index {path!r} ({os.strerror(code)}); an earlier index there is "
                    f"unchanged. Free some space or choose another path. faiss said: {err}"
                ) from err
            with open(index_tmp, "rb") as handle:
                sidecar["index_sha256"] = _sha256(handle)
            with open(sidecar_tmp, "w", encoding="utf-8") as handle:
                json.dump(sidecar, handle)
        logger.info("Saved the %s index (%d items) to %s (+ .json).", target, collection.size, path)

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
        faiss = import_faiss()
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No index file at {path!r}; write one with save_index(path).")
        with open(path, "rb") as handle:
            head = handle.read(_MIN_FAISS_FILE_BYTES)
        if len(head) < _MIN_FAISS_FILE_BYTES or head[:4] not in _FAISS_FOURCC:
            raise ValueError(
                f"{path!r} is not a faiss index written by ClipNegRetriever.save_index (it starts with {head[:4]!r}, "
                f"expected one of {sorted(_FAISS_FOURCC)}). Pass the index file itself, not its .json sidecar."
            )
        layout = _check_faiss_layout(path)
        sidecar_path = path + ".json"
        if not os.path.isfile(sidecar_path):
            raise FileNotFoundError(
                f"The index {path!r} has no sidecar {sidecar_path!r} holding its ids; save indexes with save_index(path)."
            )
        try:
            with open(sidecar_path, encoding="utf-8") as handle:
                sidecar = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"The sidecar {sidecar_path!r} is not valid JSON: {err}.") from err
        if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
            raise ValueError(f"{sidecar_path!r} is not an hf_clipneg index sidecar (no format={SIDECAR_FORMAT!r}).")
        _check_sidecar(sidecar, sidecar_path, path, layout)
        try:
            index = faiss.read_index(path)
        except RuntimeError as err:
            raise ValueError(f"faiss cannot read {path!r} (truncated or corrupt index file): {err}") from err
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"{path!r} is not an inner-product index; rebuild it with index_images/index_texts.")
        _check_index_classes(faiss, index, path)
        if index.d != self.embedding_dim:
            raise ValueError(
                f"The index in {path!r} holds {index.d}-dimensional vectors but this model embeds into "
                f"{self.embedding_dim} dimensions; rebuild the index with this model."
            )
        ids = sidecar.get("ids")
        if not isinstance(ids, list) or len(ids) != index.ntotal:
            raise ValueError(
                f"The sidecar {sidecar_path!r} lists {len(ids) if isinstance(ids, list) else 'no'} ids but the index "
                f"holds {index.ntotal} vectors; the two files do not belong together."
            )
        _check_saved_ids(ids, sidecar_path)
        if sidecar.get("model_fingerprint") != self.model_fingerprint():
            logger.warning(
                "The index %s was built by a model with different projection weights (%s, fingerprint %s, this model "
                "%s); its vectors may not match this model's queries. Rebuild it if results look wrong.",
                path, sidecar.get("model_name_or_path"), sidecar.get("model_fingerprint"), self.model_fingerprint(),
            )
        target = _check_target(target or sidecar.get("target", "images"))
        index_type = _coerce_index_type(sidecar.get("index_type") or _FAISS_FOURCC[head[:4]])
        self._collections[target] = _Collection(
            _maybe_to_gpu(index), ids, index_type, sidecar.get("nlist"), sidecar.get("nprobe")
        )
        logger.info("Loaded a %s index of %d %s from %s.", index_type.value, len(ids), target, path)

    # ------------------------------------------------------------------ helpers
    def _require(self, target: str, hint: str) -> _Collection:
        collection = self._collections[target]
        if collection is None or collection.size == 0:
            raise RuntimeError(f"The {target} index is empty: {hint}.")
        return collection

    def _prepare_vectors(self, vectors: Any, name: str) -> np.ndarray:
        if isinstance(vectors, torch.Tensor):
            vectors = vectors.detach().to("cpu", torch.float32).numpy()
        matrix = np.asarray(vectors)
        if matrix.dtype == object or not np.issubdtype(matrix.dtype, np.number):
            raise TypeError(f"{name} must be a numeric matrix, got dtype {matrix.dtype}.")
        if matrix.ndim == 1:
            matrix = matrix[None, :]
        if matrix.ndim != 2 or matrix.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty (N, {self.embedding_dim}) matrix, got shape {matrix.shape}.")
        if matrix.shape[1] != self.embedding_dim:
            raise ValueError(
                f"{name} have dimension {matrix.shape[1]} but the model embeds into {self.embedding_dim} dimensions."
            )
        matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        bad = np.flatnonzero(~np.isfinite(matrix).all(axis=1))
        if len(bad):
            raise ValueError(f"{name} row {bad[0]} contains NaN or inf ({len(bad)} such rows in all).")
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        zero = np.flatnonzero(norms[:, 0] == 0)
        if len(zero):
            raise ValueError(f"{name} row {zero[0]} is the zero vector; it has no direction to search with.")
        return matrix / norms


def _check_target(target: str) -> str:
    if target not in ("images", "texts"):
        raise ValueError(f"target must be 'images' or 'texts', got {target!r}.")
    return target


def _coerce_index_type(value: str | IndexType) -> IndexType:
    try:
        return IndexType(value.lower() if isinstance(value, str) else value)
    except ValueError:
        raise ValueError(f"index_type must be one of {[t.value for t in IndexType]}, got {value!r}.") from None


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")


def _check_ids(ids: Sequence[Hashable] | None, n: int) -> list[Hashable]:
    if ids is None:
        return list(range(n))
    ids = ids.tolist() if isinstance(ids, (np.ndarray, torch.Tensor)) else list(ids)
    if len(ids) != n:
        raise ValueError(f"Got {len(ids)} ids for {n} vectors; give exactly one id per item.")
    seen: dict[Hashable, int] = {}
    for row, item_id in enumerate(ids):
        if not isinstance(item_id, Hashable) or item_id is None:
            raise TypeError(f"id row {row} ({item_id!r}) cannot be used as an id; use strings or integers.")
        if item_id in seen:
            raise ValueError(f"id {item_id!r} appears at rows {seen[item_id]} and {row}; ids must be unique.")
        seen[item_id] = row
    return ids


def _check_texts(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError("No texts to embed: the input is empty.")
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"Text row {row} is a {type(text).__name__}, not a string.")
        if not text.strip():
            raise ValueError(f"Text row {row} is empty; remove it or give it some words.")
    return texts


def _is_single_image(value: Any) -> bool:
    return isinstance(value, (Image.Image, str, os.PathLike, bytes, bytearray)) or (
        isinstance(value, np.ndarray) and value.ndim in (2, 3) and value.dtype != object
        and (value.ndim == 2 or value.shape[-1] in (1, 3, 4))
    )


def _count(images: Any) -> int | None:
    try:
        return 1 if _is_single_image(images) else len(images)
    except TypeError:
        return None


def _image_batches(images: Any, batch_size: int, image_column: str) -> Iterable[tuple[int, list[Any]]]:
    """Yield ``(first_row, values)`` batches from a list, a single image or a `datasets.Dataset` column."""
    from datasets import Dataset

    if isinstance(images, Dataset):
        if image_column not in images.column_names:
            raise KeyError(
                f"The dataset has no column {image_column!r} (columns: {images.column_names}); pass image_column=..."
            )
        column = without_image_decoding(images.select_columns([image_column]), image_column)
        for start in range(0, len(column), batch_size):
            yield start, column[start : start + batch_size][image_column]
        return
    if _is_single_image(images):
        images = [images]
    batch: list[Any] = []
    start = 0
    for value in images:
        batch.append(value)
        if len(batch) == batch_size:
            yield start, batch
            start += len(batch)
            batch = []
    if batch:
        yield start, batch


class _FaissReader:
    """Walk a faiss index file, checking every declared size against the bytes that are left, without
    reading the (possibly huge) vector data."""

    def __init__(self, handle: Any, size: int, path: str):
        self.handle, self.size, self.path, self.pos = handle, size, path, 0

    def fail(self, why: str) -> ValueError:
        return ValueError(
            f"faiss cannot read {self.path!r} as an index written by ClipNegRetriever.save_index: {why} (at byte {self.pos} of "
            f"{self.size}). The file is truncated, corrupt or crafted; rebuild it with index_images/index_texts."
        )

    def read(self, n: int) -> bytes:
        if n > self.size - self.pos:
            raise self.fail(f"it declares {n} more bytes but only {self.size - self.pos} are left")
        data = self.handle.read(n)
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        if n < 0 or n > self.size - self.pos:
            raise self.fail(f"it declares {n} bytes of data but only {self.size - self.pos} are left")
        self.handle.seek(n, os.SEEK_CUR)
        self.pos += n

    def int32(self) -> int:
        return int.from_bytes(self.read(4), "little", signed=True)

    def int64(self) -> int:
        return int.from_bytes(self.read(8), "little", signed=True)

    def uint64(self) -> int:
        return int.from_bytes(self.read(8), "little", signed=False)

    def header(self) -> tuple[int, int]:
        """The common index header: returns (d, ntotal)."""
        d, ntotal = self.int32(), self.int64()
        self.skip(16)  # two unused 64-bit fields
        self.skip(1)  # is_trained
        metric = self.int32()
        if metric > 1:
            self.skip(4)  # metric_arg
        if not 1 <= d <= _MAX_INDEX_DIM:
            raise self.fail(f"it declares a dimension of {d}")
        if ntotal < 0:
            raise self.fail(f"it declares {ntotal} vectors")
        if metric != 0:  # faiss.METRIC_INNER_PRODUCT
            raise self.fail(f"its metric is {metric}, not inner product")
        return d, ntotal

    def flat_codes(self, d: int, ntotal: int) -> None:
        count = self.uint64()  # the float count of the stored vectors
        if count != d * ntotal:
            raise self.fail(f"it declares {ntotal} vectors of dimension {d} but stores {count} floats")
        self.skip(4 * count)


def _check_faiss_layout(path: str) -> dict[str, int]:
    """Check the structure of a faiss file of the kinds `save_index` writes; return its d, ntotal and kind."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        reader = _FaissReader(handle, size, path)
        fourcc = reader.read(4)
        kind = _FAISS_FOURCC.get(fourcc)
        d, ntotal = reader.header()
        if kind == "flat":
            reader.flat_codes(d, ntotal)
            nlist = None
        else:
            nlist, _nprobe = reader.uint64(), reader.uint64()
            if not 1 <= nlist <= max(ntotal, 1) * 4 + 1 or nlist > size:
                raise reader.fail(f"it declares {nlist} inverted lists for {ntotal} vectors")
            quantizer = reader.read(4)
            if quantizer != b"IxFI":
                raise reader.fail(f"its coarse quantizer is {quantizer!r}, not the flat inner-product index save_index writes")
            q_d, q_total = reader.header()
            if q_d != d or q_total != nlist:
                raise reader.fail(f"its quantizer holds {q_total} centroids of dimension {q_d}, expected {nlist} of {d}")
            reader.flat_codes(q_d, q_total)
            if reader.read(1) != b"\x00" or reader.uint64() != 0:
                raise reader.fail("it has a direct map, which save_index never writes")
            if reader.read(4) != b"ilar":
                raise reader.fail("its inverted lists are not stored in the array format")
            if reader.uint64() != nlist:
                raise reader.fail("its inverted lists disagree with its list count")
            code_size = reader.uint64()
            if code_size != 4 * d:
                raise reader.fail(f"its code size is {code_size} bytes, expected {4 * d} (flat float vectors)")
            layout = reader.read(4)
            if layout == b"full":
                if reader.uint64() != nlist:
                    raise reader.fail("its list-size table does not have one entry per list")
                sizes = [reader.uint64() for _ in range(nlist)]
            elif layout == b"sprs":
                count = reader.uint64()
                if count % 2 or count // 2 > nlist:
                    raise reader.fail("its sparse list-size table is malformed")
                sizes = [0] * nlist
                for _ in range(count // 2):
                    list_no, list_size = reader.uint64(), reader.uint64()
                    if list_no >= nlist:
                        raise reader.fail(f"it names list {list_no} of {nlist}")
                    sizes[list_no] = list_size
            else:
                raise reader.fail(f"its list sizes are stored as {layout!r}")
            if sum(sizes) != ntotal:
                raise reader.fail(f"its lists hold {sum(sizes)} vectors but its header says {ntotal}")
            for list_size in sizes:
                reader.skip(list_size * (code_size + 8))  # codes, then 64-bit ids
        if reader.pos != size:
            raise reader.fail(f"{size - reader.pos} bytes follow the index")
    return {"d": d, "ntotal": ntotal, "kind": kind, "nlist": nlist}


def _check_index_classes(faiss: Any, index: Any, path: str) -> None:
    """Only the classes save_index writes: IndexFlatIP, or IndexIVFFlat over an IndexFlatIP quantizer."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIVFFlat):
        quantizer = faiss.downcast_index(index.quantizer)
        if type(quantizer) is faiss.IndexFlatIP:
            return
        raise ValueError(f"{path!r} is an IVF index over a {type(quantizer).__name__}, which save_index never writes.")
    if type(index) is faiss.IndexFlatIP:
        return
    raise ValueError(f"{path!r} holds a {type(index).__name__}, which save_index never writes.")


def _sha256(handle: Any) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: handle.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def _check_sidecar(sidecar: dict, sidecar_path: str, path: str, layout: dict[str, int]) -> None:
    """The sidecar's fields have the types save_index writes and agree with the index file."""
    problems = []
    if sidecar.get("target", "images") not in ("images", "texts"):
        problems.append(f"target is {sidecar.get('target')!r}")
    if sidecar.get("index_type", layout["kind"]) != layout["kind"]:
        problems.append(f"index_type is {sidecar.get('index_type')!r} but the file holds a {layout['kind']} index")
    for key in ("nlist", "nprobe", "dim", "ntotal"):
        value = sidecar.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            problems.append(f"{key} is {value!r}, not a non-negative integer")
    if isinstance(sidecar.get("dim"), int) and sidecar["dim"] != layout["d"]:
        problems.append(f"dim is {sidecar['dim']} but the index holds {layout['d']}-dimensional vectors")
    if isinstance(sidecar.get("ntotal"), int) and sidecar["ntotal"] != layout["ntotal"]:
        problems.append(f"ntotal is {sidecar['ntotal']} but the index holds {layout['ntotal']} vectors")
    if layout["nlist"] is not None and isinstance(sidecar.get("nlist"), int) and sidecar["nlist"] != layout["nlist"]:
        problems.append(f"nlist is {sidecar['nlist']} but the index has {layout['nlist']} lists")
    if problems:
        raise ValueError(
            f"The sidecar {sidecar_path!r} does not describe {path!r}: {'; '.join(problems)}. The two files do not "
            "belong together; save the index again with save_index(path)."
        )
    expected = sidecar.get("index_sha256")
    if expected is not None:
        with open(path, "rb") as handle:
            if not isinstance(expected, str) or _sha256(handle) != expected:
                raise ValueError(
                    f"The index {path!r} is not the file its sidecar {sidecar_path!r} was written with (checksum "
                    "mismatch): the pair was mixed up or one of them changed. Save the index again with save_index(path)."
                )


def _check_saved_ids(ids: list, sidecar_path: str) -> None:
    seen: dict[Any, int] = {}
    for row, item_id in enumerate(ids):
        if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
            raise ValueError(
                f"The sidecar {sidecar_path!r} has an id of type {type(item_id).__name__} at row {row} ({item_id!r}); "
                "save_index writes only string and integer ids. Save the index again with save_index(path)."
            )
        if item_id in seen:
            raise ValueError(
                f"The sidecar {sidecar_path!r} lists the id {item_id!r} at rows {seen[item_id]} and {row}; ids must be "
                "unique. Save the index again with save_index(path)."
            )
        seen[item_id] = row


def _maybe_to_gpu(index: Any) -> Any:
    if faiss_gpu_count() > 0:
        return import_faiss().index_cpu_to_all_gpus(index)
    return index


def _is_gpu_index(index: Any) -> bool:
    name = type(index).__name__
    return name.startswith("Gpu") or name in ("IndexReplicas", "IndexShards")
