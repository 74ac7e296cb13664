"""Loading and crash-safe saving of ONNX files, external data included.

Loading validates every external-data reference before anything is read: the location
must be relative, resolve inside the model's folder (symbolic links included), name a
regular file, and the file must hold the bytes the tensor claims.

Saving never leaves a model that does not load, whenever the process is killed:

1. changed and external tensors are streamed into a temporary file, which is synced and
   renamed to a data-file name that no model involved reads (neither the source nor
   the file being replaced), so both old models keep loading;
2. the model proto is written to a temporary file, synced, and renamed over the
   destination: the one step that switches from the old model to the new one;
3. data files that only the replaced destination used, and that carry our naming
   (``<name>.data``, ``<name>.<k>.data``), are deleted.

A kill before step 2 leaves the old model (and maybe an unused data file that the next
run reuses or replaces); a kill after it leaves the new one.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from cle_core import CLEError
from cle_core.toolkit import (
    commit,
    discard,
    file_mode,
    folder_of,
    remove_stale_temps,
    staged,
)

# Serialized protos cannot exceed 2 GiB; past this size weights go to external data.
_INLINE_LIMIT = 1_800_000_000
_CHUNK = 64 << 20


class ModelFileError(CLEError):
    """The file is missing, unreadable, not a valid ONNX model, or its external data is
    missing, truncated or outside the model's folder."""


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model: initializers, sparse ones, and tensor attributes, in
    the main graph and in every subgraph."""

    def walk(graph: onnx.GraphProto):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors
                elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                    yield attr.sparse_tensor.values
                    yield attr.sparse_tensor.indices
                elif attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        yield from walk(g)

    yield from walk(model.graph)


def _external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def _nbytes(t: onnx.TensorProto) -> int:
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    return int(np.prod(t.dims, dtype=np.int64)) * np.dtype(dtype).itemsize


def external_location(t: onnx.TensorProto, base_dir: str | os.PathLike) -> tuple[Path, int, int]:
    """``(file, offset, length)`` of an externally stored tensor, checked: a relative
    location that stays inside ``base_dir`` once links are resolved, a regular file
    that holds ``offset + length`` bytes. Raises :class:`ModelFileError`."""
    info = {e.key: e.value for e in t.external_data}
    where = f"tensor {t.name!r}"
    location = info.get("location", "")
    if not location:
        raise ModelFileError(f"{where} is stored externally but names no file")
    if os.path.isabs(location) or Path(location).drive:
        raise ModelFileError(f"{where}: external data location {location!r} is an absolute path")
    base = os.path.realpath(base_dir)
    path = os.path.realpath(os.path.join(base, location))
    if os.path.commonpath([base, path]) != base:
        raise ModelFileError(
            f"{where}: external data location {location!r} leads outside the model's "
            f"folder {base_dir}"
        )
    if not os.path.isfile(path):
        raise ModelFileError(
            f"{where}: external data file {location!r} not found in {os.path.abspath(base_dir)}"
        )
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else _nbytes(t)
    except (ValueError, KeyError, TypeError):
        raise ModelFileError(f"{where}: malformed external data offset or length") from None
    size = os.path.getsize(path)
    if offset < 0 or length < 0 or offset + length > size:
        raise ModelFileError(
            f"{where}: external data file {location!r} is truncated ({size} bytes; the tensor "
            f"needs bytes {offset} to {offset + length})"
        )
    return Path(path), offset, length


def external_files(model: onnx.ModelProto, base_dir: str | os.PathLike) -> set[Path]:
    """The resolved paths of the external data files the model reads (each checked
    with :func:`external_location`)."""
    return {external_location(t, base_dir)[0] for t in all_tensors(model) if _external(t)}


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(_external(t) for t in all_tensors(model))


def load(path: str | os.PathLike, external_data: bool = False) -> onnx.ModelProto:
    """Load an ONNX file and validate its external-data references. External data stays
    on disk (it is memory-mapped later) unless ``external_data`` is True.

    Raises :class:`ModelFileError` for a missing or corrupt file and for external data
    that is missing, truncated, or outside the model's folder."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a model file" if path.is_dir() else "no such file"
        raise ModelFileError(f"{path}: {what}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
        raise ModelFileError(
            f"{path}: not a readable ONNX model ({exc.__class__.__name__})"
        ) from None
    except Exception as exc:  # protobuf raises several types for corrupt input
        raise ModelFileError(f"{path}: not a readable ONNX model ({exc})") from None
    if not model.graph.node and not model.graph.initializer:
        raise ModelFileError(f"{path}: not an ONNX model (empty graph)")
    try:
        external_files(model, folder_of(path))
    except ModelFileError as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    if external_data:
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(folder_of(path)))
        except Exception as exc:
            raise ModelFileError(f"{path}: cannot read external data ({exc})") from None
    return model


def files_read(model: onnx.ModelProto, path: str | os.PathLike) -> set[Path]:
    """Resolved paths of the model file at ``path`` and of every data file it reads."""
    path = Path(path)
    return {Path(os.path.realpath(path))} | external_files(model, folder_of(path))


def _files_of_existing(path: Path) -> set[Path]:
    """The data files that the model now at ``path`` reads (empty if there is none or
    it does not load): the new data file must not overwrite them."""
    if not path.is_file():
        return set()
    # Only files with the names our saver gives matter (the new data file takes one,
    # step 3 deletes only those): where none is beside it, the old model is not parsed
    # (a 531 MB file with its weights inside: 1.3 s and as much memory again).
    if not any(_our_data_name(path, name) for name in os.listdir(folder_of(path))):
        return set()
    try:
        return external_files(onnx.load(str(path), load_external_data=False), folder_of(path))
    except Exception:
        return set()


def _data_names(path: Path) -> Iterator[str]:
    yield f"{path.name}.data"
    k = 1
    while True:
        yield f"{path.name}.{k}.data"
        k += 1


def _our_data_name(path: Path, name: str) -> bool:
    """Whether ``name`` is one our saver gives ``path``'s data (see :func:`_data_names`)."""
    return re.fullmatch(re.escape(path.name) + r"(\.\d+)?\.data", name) is not None


def _ours(path: Path, data_file: Path) -> bool:
    """Whether ``data_file`` carries the name our saver gives ``path``'s data."""
    return folder_of(path).resolve() == data_file.parent and _our_data_name(path, data_file.name)


def save(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    source_dir: str | None = None,
    pending: dict[str, np.ndarray] | None = None,
    avoid: Iterable[Path] = (),
    keep: Iterable[Path] | None = None,
) -> list[Path]:
    """Write ``model`` to ``path`` with the crash-safe protocol of this module.

    Tensors stored externally in the source (``source_dir``), tensors in ``pending``
    (changed external tensors), and everything when the model would exceed 2 GiB are
    written to a data file beside the output, streaming the unchanged ones from the
    source file in chunks. ``avoid``: files that must not be written (those the source
    model reads); ``keep``: files the clean-up must not delete (default: ``avoid``;
    empty when the source is the file being replaced). New files get the mode the
    umask gives; a replaced file keeps its mode. Returns the files written.
    """
    path = Path(path)
    folder = folder_of(path)
    remove_stale_temps(folder)
    pending = dict(pending or {})
    inits = list(model.graph.initializer)
    external = any(_external(t) for t in inits) or bool(pending)
    if not external and model.ByteSize() > _INLINE_LIMIT:
        external = True
    avoid = {Path(os.path.realpath(p)) for p in avoid}
    keep = avoid if keep is None else {Path(os.path.realpath(p)) for p in keep}
    old_files = _files_of_existing(path)
    data_path = None
    data_tmp = None
    try:
        if external:
            taken = avoid | old_files
            data_name = next(
                n
                for n in _data_names(path)
                if Path(os.path.realpath(folder / n)) not in taken and not (folder / n).is_dir()
            )
            data_path = folder / data_name
            like = next(iter(sorted(old_files)), None)
            with staged(data_path, file_mode(data_path, like)) as (out, data_tmp):
                _write_data(out, inits, pending, source_dir, data_name)
            commit(data_tmp, data_path)  # step 1: no model reads this name yet
        blob = model.SerializeToString()
        with staged(path) as (f, tmp):
            f.write(blob)
        commit(tmp, path)  # step 2: the switch
    except BaseException:
        if data_path is not None and data_tmp is not None:
            discard(data_tmp)
        raise
    new_files = {Path(os.path.realpath(data_path))} if data_path is not None else set()
    for stale in old_files - new_files - keep:  # step 3
        if _ours(path, stale):
            with contextlib.suppress(OSError):
                os.unlink(stale)
    return [path] + ([data_path] if data_path is not None else [])


def _write_data(out, inits, pending: dict, source_dir: str | None, data_name: str) -> None:
    for t in inits:
        if t.name in pending:
            blob = np.ascontiguousarray(pending.pop(t.name)).tobytes()
            _point(t, data_name, out.tell(), len(blob))
            out.write(blob)
        elif _external(t):
            _copy_external(t, source_dir, out, data_name)
        elif t.ByteSize() > 1024:
            blob = onnx.numpy_helper.to_array(t).tobytes()
            offset = out.tell()
            out.write(blob)
            for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                t.ClearField(f)
            _point(t, data_name, offset, len(blob))


def _point(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del t.external_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value


def _copy_external(t: onnx.TensorProto, source_dir: str | None, out, location: str) -> None:
    src, offset, length = external_location(t, source_dir or ".")
    start = out.tell()
    with open(src, "rb") as f:
        f.seek(offset)
        remaining = length
        while remaining:
            chunk = f.read(min(_CHUNK, remaining))
            if not chunk:
                raise ModelFileError(f"{src}: external data for {t.name!r} is truncated")
            out.write(chunk)
            remaining -= len(chunk)
    _point(t, location, start, length)
