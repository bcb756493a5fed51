"""`tf.train.Example` serialisation without TensorFlow (a minimal protobuf wire-format codec).

Messages handled (field numbers from tensorflow/core/example/{example,feature}.proto):

  Example   { Features features = 1; }
  Features  { map<string, Feature> feature = 1; }   // map entry: { string key = 1; Feature value = 2; }
  Feature   { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }
  BytesList { repeated bytes value = 1; }
  FloatList { repeated float value = 1 [packed = true]; }
  Int64List { repeated int64 value = 1 [packed = true]; }

The encoder writes map entries sorted by key (deterministic bytes, like protobuf's deterministic
serialisation) and packed numeric lists, as TensorFlow does. The decoder accepts packed and unpacked
numeric lists and skips unknown fields, so it reads records written by TensorFlow or tfds. Our own
codec keeps the torch-only export tool free of TensorFlow and of tfds' heavy import (~130 modules).

Values for `encode_example`: bytes / str -> bytes_list; int or integer array -> int64_list; float or
floating array -> float_list (float32); lists of those. `decode_example` returns, per feature,
`list[bytes]`, an int64 array or a float32 array.
"""
from __future__ import annotations

import struct
from collections.abc import Mapping

import numpy as np


class ExampleDecodeError(ValueError):
  """A serialized Example is malformed."""


# --- wire-format primitives ---

def _varint(v: int) -> bytes:
  v &= 0xFFFFFFFFFFFFFFFF  # negative int64 -> two's complement, 10 bytes
  out = bytearray()
  while v > 0x7F:
    out.append((v & 0x7F) | 0x80)
    v >>= 7
  out.append(v)
  return bytes(out)


def _read_varint(buf, pos: int, end: int) -> tuple[int, int]:
  result = 0
  shift = 0
  while True:
    if pos >= end:
      raise ExampleDecodeError("truncated varint")
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if not b & 0x80:
      return result, pos
    shift += 7
    if shift > 63:
      raise ExampleDecodeError("varint too long")


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
  key = _varint((number << 3) | wire_type)
  if wire_type == 2:
    return key + _varint(len(payload)) + payload
  return key + payload


def _iter_fields(buf, pos: int, end: int):
  """Yields (field number, wire type, value or (start, stop) span) of one message."""
  while pos < end:
    key, pos = _read_varint(buf, pos, end)
    number, wt = key >> 3, key & 7
    if wt == 0:
      v, pos = _read_varint(buf, pos, end)
      yield number, wt, v
    elif wt == 2:
      n, pos = _read_varint(buf, pos, end)
      if pos + n > end:
        raise ExampleDecodeError("length-delimited field runs past its message")
      yield number, wt, (pos, pos + n)
      pos += n
    elif wt == 5:
      if pos + 4 > end:
        raise ExampleDecodeError("truncated fixed32")
      yield number, wt, (pos, pos + 4)
      pos += 4
    elif wt == 1:
      if pos + 8 > end:
        raise ExampleDecodeError("truncated fixed64")
      yield number, wt, (pos, pos + 8)
      pos += 8
    else:
      raise ExampleDecodeError(f"unsupported wire type {wt}")


# --- encoding ---

def _kind_of(value) -> tuple[str, list]:
  """Classifies a feature value into ('bytes'|'int64'|'float', list of items)."""
  if isinstance(value, (bytes, bytearray, memoryview, str)):
    value = [value]
  elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
    value = [value]
  elif isinstance(value, bool):
    value = [int(value)]
  arr = value if isinstance(value, np.ndarray) else None
  if arr is not None:
    if arr.dtype.kind in "iub":
      return "int64", arr.astype(np.int64).ravel().tolist()
    if arr.dtype.kind == "f":
      return "float", arr.astype(np.float32).ravel()
    if arr.dtype.kind in "SO":
      value = arr.ravel().tolist()
    else:
      raise TypeError(f"cannot store an array of dtype {arr.dtype} in an Example")
  items = list(value)
  if not items:
    raise TypeError("empty lists are ambiguous: pass a numpy array with a dtype")
  if all(isinstance(x, (bytes, bytearray, memoryview, str)) for x in items):
    return "bytes", [x.encode("utf-8") if isinstance(x, str) else bytes(x) for x in items]
  if all(isinstance(x, (int, np.integer)) for x in items):
    return "int64", [int(x) for x in items]
  if all(isinstance(x, (int, float, np.integer, np.floating)) for x in items):
    return "float", np.asarray(items, dtype=np.float32)
  raise TypeError(f"cannot store values of types {sorted({type(x).__name__ for x in items})}")


def encode_feature(value) -> bytes:
  """Serialized `Feature` message for one value (see module docstring for accepted types)."""
  kind, items = _kind_of(value)
  if kind == "bytes":
    inner = b"".join(_field(1, 2, x) for x in items)
    return _field(1, 2, inner)
  if kind == "int64":
    packed = b"".join(_varint(v) for v in items)
    return _field(3, 2, _field(1, 2, packed) if items else b"")
  packed = np.asarray(items, dtype="<f4").tobytes()
  return _field(2, 2, _field(1, 2, packed) if len(items) else b"")


def encode_example(features: Mapping[str, object]) -> bytes:
  """Serialized `tf.train.Example` of a {name: value} mapping, keys sorted (deterministic)."""
  parts = []
  for key in sorted(features):
    entry = _field(1, 2, key.encode("utf-8")) + _field(2, 2, encode_feature(features[key]))
    parts.append(_field(1, 2, entry))
  return _field(1, 2, b"".join(parts))


# --- decoding ---

def _decode_list(buf, start, stop, kind):
  if kind == "bytes":
    return [bytes(buf[a:b]) for num, wt, (a, b) in _iter_fields(buf, start, stop) if num == 1 and wt == 2]
  vals = []
  for num, wt, v in _iter_fields(buf, start, stop):
    if num != 1:
      continue
    if kind == "float":
      if wt == 2:  # packed
        a, b = v
        if (b - a) % 4:
          raise ExampleDecodeError("packed float list length is not a multiple of 4")
        vals.extend(np.frombuffer(bytes(buf[a:b]), dtype="<f4").tolist())
      elif wt == 5:
        vals.append(struct.unpack("<f", bytes(buf[v[0]:v[1]]))[0])
    else:
      if wt == 2:  # packed varints
        pos, b = v
        while pos < b:
          x, pos = _read_varint(buf, pos, b)
          vals.append(x)
      elif wt == 0:
        vals.append(v)
  if kind == "float":
    return np.asarray(vals, dtype=np.float32)
  return np.asarray(vals, dtype=np.uint64).astype(np.int64)  # two's complement back to signed


def _decode_feature(buf, start, stop):
  value = []
  for num, wt, span in _iter_fields(buf, start, stop):
    if wt != 2:
      continue
    if num == 1:
      value = _decode_list(buf, *span, "bytes")
    elif num == 2:
      value = _decode_list(buf, *span, "float")
    elif num == 3:
      value = _decode_list(buf, *span, "int64")
  return value


def decode_example(data) -> dict[str, object]:
  """{name: list[bytes] | int64 array | float32 array} of a serialized `tf.train.Example`."""
  buf = memoryview(data).cast("B")
  out = {}
  try:
    for num, wt, (fs, fe) in ((n, w, v) for n, w, v in _iter_fields(buf, 0, len(buf)) if n == 1 and w == 2):
      for n2, w2, (es, ee) in ((n, w, v) for n, w, v in _iter_fields(buf, fs, fe) if n == 1 and w == 2):
        key, value = None, []
        for n3, w3, span in _iter_fields(buf, es, ee):
          if n3 == 1 and w3 == 2:
            key = bytes(buf[span[0]:span[1]]).decode("utf-8")
          elif n3 == 2 and w3 == 2:
            value = _decode_feature(buf, *span)
        if key is None:
          raise ExampleDecodeError("feature map entry without a key")
        out[key] = value
  except UnicodeDecodeError as e:
    raise ExampleDecodeError(f"feature name is not UTF-8: {e}") from None
  except (TypeError, ValueError) as e:  # slicing of malformed spans etc.
    if isinstance(e, ExampleDecodeError):
      raise
    raise ExampleDecodeError(str(e)) from None
  return out
