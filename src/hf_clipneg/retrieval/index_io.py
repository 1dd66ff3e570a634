"""Saving and loading a `ClipNegRetriever` index: the faiss file plus a JSON sidecar with its ids and metadata.

A load trusts nothing it reads: the faiss file's structure is checked before faiss parses it (`faiss_file`),
the sidecar must describe that very file (fields, sizes and a sha256 of the index bytes), and the loaded index
must be of a class `save_index` writes, with the model's embedding dimension.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from typing import Any

from hf_clipneg._atomic import atomic_files
from hf_clipneg._faiss import import_faiss

from .faiss_file import FAISS_FOURCC, MIN_FAISS_FILE_BYTES, check_faiss_layout
from .faiss_index import Collection, is_gpu_index, maybe_to_gpu
from .inputs import check_target, coerce_index_type

logger = logging.getLogger(__name__)

SIDECAR_FORMAT = "hf_clipneg-faiss-index"
SIDECAR_VERSION = 1


def write_index(
    collection: Collection, path: str | os.PathLike, target: str, model_fingerprint: str, model_name_or_path: str | None
) -> None:
    """Write `collection` to `path` (faiss format) and ``path + ".json"`` (ids, metadata, sha256 of the index).

    Both files are written completely beside their targets before either replaces an earlier pair. Raises a
    TypeError for ids other than str and int (the sidecar is JSON), and an OSError (ENOSPC or EIO) when faiss
    cannot write, leaving an earlier pair unchanged. Called by `ClipNegRetriever.save_index`, whose example
    shows a round trip.
    """
    faiss = import_faiss()
    path = os.fspath(path)
    for row, item_id in enumerate(collection.ids):
        if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
            raise TypeError(
                f"id row {row} is a {type(item_id).__name__}; only str and int ids can be saved to the JSON sidecar."
            )
    index = collection.index
    if is_gpu_index(index):
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
        "model_fingerprint": model_fingerprint,
        "model_name_or_path": model_name_or_path,
        "ids": collection.ids,
    }
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


def read_index(
    path: str | os.PathLike, embedding_dim: int, model_fingerprint: str, target: str | None = None
) -> tuple[str, Collection]:
    """Load an index written by `write_index`: returns its target (`target`, else the saved one) and collection.

    Refuses (ValueError, or FileNotFoundError for a missing file) files that are not faiss indexes of the kinds
    `write_index` writes, a missing or inconsistent JSON sidecar, and an embedding dimension other than
    `embedding_dim`. An index built by a model with another `model_fingerprint` only warns (its scores are then
    not comparable with that model's queries). The sidecar's ids must be unique strings or integers, one per
    vector. The index goes onto the GPUs when faiss sees any.
    """
    faiss = import_faiss()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No index file at {path!r}; write one with save_index(path).")
    with open(path, "rb") as handle:
        head = handle.read(MIN_FAISS_FILE_BYTES)
    if len(head) < MIN_FAISS_FILE_BYTES or head[:4] not in FAISS_FOURCC:
        raise ValueError(
            f"{path!r} is not a faiss index written by ClipNegRetriever.save_index (it starts with {head[:4]!r}, "
            f"expected one of {sorted(FAISS_FOURCC)}). Pass the index file itself, not its .json sidecar."
        )
    layout = check_faiss_layout(path)
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
    if index.d != embedding_dim:
        raise ValueError(
            f"The index in {path!r} holds {index.d}-dimensional vectors but this model embeds into "
            f"{embedding_dim} dimensions; rebuild the index with this model."
        )
    ids = sidecar.get("ids")
    if not isinstance(ids, list) or len(ids) != index.ntotal:
        raise ValueError(
            f"The sidecar {sidecar_path!r} lists {len(ids) if isinstance(ids, list) else 'no'} ids but the index "
            f"holds {index.ntotal} vectors; the two files do not belong together."
        )
    _check_saved_ids(ids, sidecar_path)
    if sidecar.get("model_fingerprint") != model_fingerprint:
        logger.warning(
            "The index %s was built by a model with different projection weights (%s, fingerprint %s, this model "
            "%s); its vectors may not match this model's queries. Rebuild it if results look wrong.",
            path, sidecar.get("model_name_or_path"), sidecar.get("model_fingerprint"), model_fingerprint,
        )
    target = check_target(target or sidecar.get("target", "images"))
    index_type = coerce_index_type(sidecar.get("index_type") or FAISS_FOURCC[head[:4]])
    collection = Collection(maybe_to_gpu(index), ids, index_type, sidecar.get("nlist"), sidecar.get("nprobe"))
    logger.info("Loaded a %s index of %d %s from %s.", index_type.value, len(ids), target, path)
    return target, collection


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
