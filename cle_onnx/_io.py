"""Loading and atomic saving of ONNX files, with external data streamed, not copied."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from cle_core import CLEError

# Serialized protos cannot exceed 2 GiB; past this size weights go to external data.
_INLINE_LIMIT = 1_800_000_000
_CHUNK = 64 << 20


class ModelFileError(CLEError):
    """The file is missing, unreadable, or not a valid ONNX model."""


def load(path: str | os.PathLike, external_data: bool = False) -> onnx.ModelProto:
    """Load an ONNX file. External data stays on disk (it is memory-mapped later) unless
    ``external_data`` is True."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=external_data)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
        raise ModelFileError(
            f"{path}: not a readable ONNX model ({exc.__class__.__name__})"
        ) from None
    except Exception as exc:  # protobuf raises several types for corrupt input
        raise ModelFileError(f"{path}: not a readable ONNX model ({exc})") from None
    if not model.graph.node and not model.graph.initializer:
        raise ModelFileError(f"{path}: not an ONNX model (empty graph)")
    return model


def _external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def save(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    source_dir: str | None = None,
    pending: dict[str, np.ndarray] | None = None,
) -> list[Path]:
    """Write ``model`` to ``path`` atomically (temporary file, then rename).

    Tensors stored externally in the source (``source_dir``), tensors in ``pending``
    (changed external tensors), and everything when the model would exceed 2 GiB are
    written to ``<path>.data`` next to the output, streaming the unchanged ones from the
    source file in chunks. Returns the files written.
    """
    path = Path(path)
    pending = dict(pending or {})
    inits = list(model.graph.initializer)
    external = any(_external(t) for t in inits) or bool(pending)
    if not external and model.ByteSize() > _INLINE_LIMIT:
        external = True
    directory = path.parent if str(path.parent) else Path(".")
    written = []
    if external:
        data_name = path.name + ".data"
        fd, data_tmp = tempfile.mkstemp(prefix=f".{data_name}.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as out:
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
                        for f in (
                            "raw_data",
                            "float_data",
                            "int32_data",
                            "int64_data",
                            "double_data",
                        ):
                            t.ClearField(f)
                        _point(t, data_name, offset, len(blob))
                out.flush()
                os.fsync(out.fileno())
            _atomic_write(model.SerializeToString(), path, data_tmp, directory / data_name)
        except BaseException:
            if os.path.exists(data_tmp):
                os.unlink(data_tmp)
            raise
        written = [path, directory / data_name]
    else:
        _atomic_write(model.SerializeToString(), path)
        written = [path]
    return written


def _point(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del t.external_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value


def _copy_external(t: onnx.TensorProto, source_dir: str | None, out, location: str) -> None:
    info = {e.key: e.value for e in t.external_data}
    src = os.path.join(source_dir or "", info["location"])
    offset = int(info.get("offset", 0))
    length = int(info["length"]) if "length" in info else None
    start = out.tell()
    with open(src, "rb") as f:
        f.seek(offset)
        if length is None:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            length = int(np.prod(t.dims, dtype=np.int64)) * np.dtype(dtype).itemsize
        remaining = length
        while remaining:
            chunk = f.read(min(_CHUNK, remaining))
            if not chunk:
                raise ModelFileError(f"{src}: external data for {t.name!r} is truncated")
            out.write(chunk)
            remaining -= len(chunk)
    _point(t, location, start, length)


def _atomic_write(
    blob: bytes, path: Path, data_tmp: str | None = None, data_path: Path | None = None
) -> None:
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        if data_tmp is not None:
            os.replace(data_tmp, data_path)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
