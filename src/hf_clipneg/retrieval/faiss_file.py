"""Check a faiss index file's structure before faiss parses it, reading only its headers.

Only the index kinds `ClipNegRetriever.save_index` writes are accepted: an inner-product ``IndexFlatIP``, or an
``IndexIVFFlat`` over a flat inner-product quantizer with array inverted lists. Every size the file declares is
checked against the bytes it holds, so a small crafted file cannot make faiss allocate gigabytes.
"""

from __future__ import annotations

import os
from typing import Any

# The first four bytes faiss writes for the index types ClipNegRetriever builds (IndexFlatIP, IndexIVFFlat;
# "IvFl" is the IVF tag of older faiss releases). Anything else is refused before faiss parses it.
FAISS_FOURCC = {b"IxFI": "flat", b"IwFl": "ivf", b"IvFl": "ivf"}
MIN_FAISS_FILE_BYTES = 32
_MAX_INDEX_DIM = 1 << 16  # far above any embedding size; a larger declared dimension is a corrupt header


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


def check_faiss_layout(path: str) -> dict[str, int]:
    """Check the structure of a faiss file of the kinds `save_index` writes; return its d, ntotal, kind and nlist.

    Raises a ValueError naming the file, what is wrong and at which byte, for any other kind, metric or layout,
    a declared size larger than the bytes left, or bytes after the index. The caller has already checked that
    the file starts with one of `FAISS_FOURCC`.

    Example:
        >>> import os, tempfile, numpy as np
        >>> from hf_clipneg._faiss import import_faiss
        >>> faiss = import_faiss(); index = faiss.IndexFlatIP(2); index.add(np.eye(2, dtype=np.float32))
        >>> path = os.path.join(tempfile.mkdtemp(), "flat.faiss"); faiss.write_index(index, path)
        >>> check_faiss_layout(path)
        {'d': 2, 'ntotal': 2, 'kind': 'flat', 'nlist': None}
    """
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        reader = _FaissReader(handle, size, path)
        fourcc = reader.read(4)
        kind = FAISS_FOURCC.get(fourcc)
        d, ntotal = reader.header()
        if kind == "flat":
            reader.flat_codes(d, ntotal)
            nlist = None
        else:
            nlist = reader.uint64()
            reader.uint64()  # nprobe: any value is valid
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
