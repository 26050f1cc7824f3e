"""openpi's wire format: msgpack with numpy arrays as tagged maps, so any openpi client or server reads our frames.

An array travels as `{b"__ndarray__": True, b"data": raw bytes, b"dtype": dtype.str, b"shape": shape}` and a
numpy scalar as `{b"__npgeneric__": True, b"data": value, b"dtype": dtype.str}` (the tag keys are msgpack binary,
as openpi writes them). Only boolean, integer and floating dtypes cross the wire: object, void and complex dtypes
could smuggle pickles or odd memory layouts, so they are refused on both ends with a `WireError`.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

ALLOWED_KINDS = frozenset("biuf")
"""numpy dtype kinds accepted on the wire: bool, signed/unsigned integer, floating."""
_ND, _NG = b"__ndarray__", b"__npgeneric__"


class WireError(ValueError):
    """A frame that is not valid msgpack, or an array map that cannot be a numpy array of an allowed dtype."""


def _dtype(text: Any) -> np.dtype:
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    try:
        dtype = np.dtype(text)
    except TypeError as e:
        raise WireError(f"unknown array dtype {text!r}: {e}") from None
    if dtype.kind not in ALLOWED_KINDS or dtype.fields is not None:
        raise WireError(f"array dtype {dtype.str!r} is not allowed (only bool, integer and float arrays)")
    return dtype


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray | np.generic) and (obj.dtype.kind not in ALLOWED_KINDS or obj.dtype.fields):
        raise WireError(f"cannot send a numpy value of dtype {obj.dtype.str!r} (only bool, integer and float)")
    if isinstance(obj, np.ndarray):
        return {_ND: True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return {_NG: True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot serialise {type(obj).__name__} to msgpack")


def _decode(obj: dict) -> Any:
    if _ND in obj or "__ndarray__" in obj:  # openpi writes binary tag keys; accept text ones too
        obj = {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}
        dtype = _dtype(obj.get(b"dtype"))
        shape = obj.get(b"shape")
        data = obj.get(b"data")
        if not isinstance(shape, list | tuple) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise WireError(f"array shape must be a list of non-negative ints, got {shape!r}")
        if not isinstance(data, bytes):
            raise WireError(f"array data must be bytes, got {type(data).__name__}")
        expected = math.prod(shape) * dtype.itemsize
        if len(data) != expected:
            raise WireError(f"array of shape {list(shape)} and dtype {dtype.str} needs {expected} bytes, "
                            f"got {len(data)}")
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if _NG in obj or "__npgeneric__" in obj:
        obj = {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}
        return _dtype(obj.get(b"dtype")).type(obj.get(b"data"))
    return obj


def packb(obj: Any) -> bytes:
    """Serialise a dict of numpy arrays, scalars, strings and nested containers."""
    return msgpack.packb(obj, default=_encode)


def unpackb(data: bytes) -> Any:
    """Parse one frame; any malformed content raises WireError naming the problem."""
    try:
        return msgpack.unpackb(data, object_hook=_decode, strict_map_key=False)
    except WireError:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise WireError(f"not a valid msgpack frame: {type(e).__name__}: {e}") from None
