"""Write results so that a failure (a full disk, a crash, Ctrl-C) never destroys an earlier result.

Every output is first written to a temporary sibling (same folder, so the final rename stays on one
filesystem and is atomic), and only swapped into place once it is complete. `check_output_path` runs the
cheap checks (writable, not the input) before any expensive work starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence

logger = logging.getLogger(__name__)

_TMP_MARK = ".hf_clipneg-tmp-"


def _sibling(path: str, kind: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}{_TMP_MARK}{kind}-{uuid.uuid4().hex[:8]}")


DATASET_MARKERS = ("state.json", "dataset_dict.json")  # what `save_to_disk` writes


def check_output_path(
    path: str | os.PathLike,
    inputs: Iterable[str | os.PathLike | None] = (),
    what: str = "output",
    *,
    replace_markers: Sequence[str] | None = None,
    inputs_may_lie_inside: bool = False,
) -> str:
    """Raise before any work starts when `path` cannot receive a result; return its absolute path.

    Refuses a path that is one of the local `inputs`, lies inside one, or contains one (unless
    `inputs_may_lie_inside`: a training folder may hold the data, since it is never swapped as a whole);
    a parent that is a file or not writable; and, when the result replaces the whole folder
    (`replace_markers` given), an existing non-empty folder that holds none of those marker files, i.e. is
    not an earlier result of the same kind (its other files would be lost).
    """
    target = os.path.abspath(os.path.expanduser(os.fspath(path)))
    real_target = os.path.realpath(target)
    for source in inputs:
        if source is None or not isinstance(source, (str, os.PathLike)):
            continue
        source_path = os.path.abspath(os.path.expanduser(os.fspath(source)))
        if not os.path.exists(source_path):
            continue  # a Hub id, "synthetic", ...
        real_source = os.path.realpath(source_path)
        if real_target == real_source or _inside(real_target, real_source) or (
            not inputs_may_lie_inside and _inside(real_source, real_target)
        ):
            raise ValueError(
                f"The {what} {os.fspath(path)!r} overlaps the input {os.fspath(source)!r}: writing there would replace "
                "data that is being read. Choose another output location."
            )
    if replace_markers is not None and os.path.isdir(target) and os.listdir(target):
        if not any(os.path.exists(os.path.join(target, marker)) for marker in replace_markers):
            raise FileExistsError(
                f"The {what} {target!r} already holds other files (it has none of {list(replace_markers)}, so it is not "
                "an earlier result of this command); the new result would replace the whole folder. Choose a new or "
                "empty folder."
            )
    if os.path.exists(target) and replace_markers is not None and not os.path.isdir(target):
        raise NotADirectoryError(f"The {what} {target!r} is a file; a folder is written there. Choose another path.")
    existing = os.path.dirname(target)
    while not os.path.isdir(existing):
        if os.path.exists(existing):
            raise NotADirectoryError(f"Cannot write the {what} {target!r}: {existing!r} is a file, not a folder.")
        existing = os.path.dirname(existing)
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".hf_clipneg-write-test-"):
            pass
    except OSError as err:
        raise PermissionError(
            f"Cannot write the {what} {target!r}: the folder {existing!r} is not writable ({err.strerror or err}). "
            "Choose a writable output location."
        ) from err
    return target


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder and path != folder


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary sibling folder of `path`; on success it replaces `path`, on failure it is removed.

    An earlier folder at `path` stays untouched (and loadable) until the new one is complete; the swap is
    two renames on one filesystem.

    Example:
        >>> import os, tempfile
        >>> out = os.path.join(tempfile.mkdtemp(), "result")
        >>> with atomic_directory(out) as tmp:
        ...     open(os.path.join(tmp, "a.txt"), "w").close()
        >>> os.listdir(out)
        ['a.txt']
    """
    target = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"{target!r} exists and is not a folder; remove it or choose another output folder.")
    tmp = _sibling(target, "new")
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(target):
        old = _sibling(target, "old")
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_files(*paths: str | os.PathLike) -> Iterator[list[str]]:
    """Yield temporary sibling paths for `paths`; on success each replaces its target (`os.replace`), on
    failure they are removed and the targets are untouched.

    Example:
        >>> import os, tempfile
        >>> out = os.path.join(tempfile.mkdtemp(), "a.txt")
        >>> with atomic_files(out) as (tmp,):
        ...     _ = open(tmp, "w").write("done")
        >>> open(out).read()
        'done'
    """
    targets = [os.path.abspath(os.fspath(p)) for p in paths]
    for target in targets:
        os.makedirs(os.path.dirname(target), exist_ok=True)
    tmps = [_sibling(target, "new") for target in targets]
    try:
        yield tmps
        for tmp, target in zip(tmps, targets):
            os.replace(tmp, target)
    finally:
        for tmp in tmps:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)


def replace_files_into(source_dir: str, target_dir: str) -> None:
    """Move every file of `source_dir` into `target_dir` (created if needed), each with `os.replace`.

    Used where the target folder also holds things that must stay (a training folder's checkpoints): the
    files are complete before the first rename, and renames need no disk space.
    """
    os.makedirs(target_dir, exist_ok=True)
    for name in sorted(os.listdir(source_dir)):
        source = os.path.join(source_dir, name)
        target = os.path.join(target_dir, name)
        if os.path.isdir(source):
            if os.path.isdir(target):
                old = _sibling(target, "old")
                os.rename(target, old)
                os.rename(source, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(source, target)
        else:
            os.replace(source, target)
