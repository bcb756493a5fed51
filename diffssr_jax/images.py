"""Reading and writing image files (numpy + Pillow only: no jax, usable by the torch-only tools).

Every reader names the file in its error, and writers go through a temporary file and a rename so an
interrupted write never leaves a truncated PNG where a good one was expected.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import tempfile
import warnings

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageReadError(ValueError):
  """An image file could not be read; the message names the file and the problem."""


@dataclasses.dataclass
class LoadedImage:
  """An image as stored: `rgb` (H, W, 3) uint8 or uint16, optional `alpha` (H, W) of the same dtype."""
  rgb: np.ndarray
  alpha: np.ndarray | None
  bits: int  # 8 or 16
  path: str
  source_mode: str


def list_images(root) -> list[pathlib.Path]:
  """All image files below `root` (a file or a folder), sorted, recursing into subfolders."""
  root = pathlib.Path(root)
  if root.is_file():
    return [root]
  if not root.is_dir():
    raise FileNotFoundError(f"{root}: no such file or folder")
  return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image(path) -> LoadedImage:
  """Reads an image keeping its bit depth (8 or 16) and alpha channel."""
  path = str(path)
  try:
    with Image.open(path) as im:
      im.load()
      mode = im.mode
      arr = np.asarray(im)
  except FileNotFoundError:
    raise ImageReadError(f"{path}: file not found") from None
  except Exception as e:  # PIL raises many kinds for broken files
    raise ImageReadError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
  if arr.dtype == bool:
    arr = arr.astype(np.uint8) * 255
  if arr.dtype in (np.int32, np.uint32, np.int16, np.uint16) or mode.startswith("I"):
    # 16-bit PNG/TIFF greyscale arrives as int32 in mode "I" / "I;16".
    arr = np.clip(arr, 0, 65535).astype(np.uint16)
    bits = 16
  elif arr.dtype == np.uint8:
    bits = 8
  elif arr.dtype.kind == "f":
    arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    bits = 8
  else:
    raise ImageReadError(f"{path}: unsupported pixel type {arr.dtype} (mode {mode})")
  alpha = None
  if arr.ndim == 2:
    rgb = np.repeat(arr[:, :, None], 3, axis=2)
  elif arr.ndim == 3 and arr.shape[2] == 2:  # greyscale + alpha
    rgb, alpha = np.repeat(arr[:, :, :1], 3, axis=2), arr[:, :, 1]
  elif arr.ndim == 3 and arr.shape[2] == 3:
    rgb = arr
  elif arr.ndim == 3 and arr.shape[2] == 4:
    rgb, alpha = arr[:, :, :3], arr[:, :, 3]
  else:
    if mode in ("P", "CMYK", "YCbCr", "LAB", "HSV"):
      with Image.open(path) as im:
        return load_image_from_pil(im.convert("RGBA" if "transparency" in im.info else "RGB"), path)
    raise ImageReadError(f"{path}: unsupported image layout {arr.shape} (mode {mode})")
  if rgb.shape[0] == 0 or rgb.shape[1] == 0:
    raise ImageReadError(f"{path}: empty image")
  return LoadedImage(np.ascontiguousarray(rgb), alpha, bits, path, mode)


def load_image_from_pil(im, path) -> LoadedImage:
  arr = np.asarray(im)
  if arr.ndim == 3 and arr.shape[2] == 4:
    return LoadedImage(np.ascontiguousarray(arr[:, :, :3]), arr[:, :, 3].copy(), 8, str(path), im.mode)
  return LoadedImage(np.ascontiguousarray(arr[:, :, :3]), None, 8, str(path), im.mode)


def to_uint8(arr: np.ndarray) -> np.ndarray:
  """16-bit to 8-bit by rounding (x * 255 / 65535); 8-bit unchanged."""
  if arr.dtype == np.uint8:
    return arr
  return np.round(arr.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)


def read_rgb8(path, warn: bool = True) -> np.ndarray:
  """Reads any supported image as (H, W, 3) uint8 RGB; warns when greyscale, alpha or 16-bit is dropped."""
  im = load_image(path)
  notes = []
  if im.source_mode in ("L", "LA", "1", "I", "I;16", "I;16B", "F"):
    notes.append(f"greyscale ({im.source_mode}) replicated to RGB")
  if im.alpha is not None:
    notes.append("alpha channel dropped")
  if im.bits == 16:
    notes.append("16-bit converted to 8-bit")
  if warn and notes:
    warnings.warn(f"{path}: " + "; ".join(notes), stacklevel=2)
  return to_uint8(im.rgb)


def save_png(path, arr: np.ndarray, overwrite: bool = True) -> None:
  """Writes an (H, W), (H, W, 3) or (H, W, 4) uint8/uint16 array as PNG, atomically (temp file + rename)."""
  path = pathlib.Path(path)
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path}: exists (pass overwrite to replace it)")
  arr = np.asarray(arr)
  if arr.dtype not in (np.uint8, np.uint16):
    raise TypeError(f"{path}: save_png takes uint8 or uint16, got {arr.dtype}")
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  os.close(fd)
  try:
    if arr.dtype == np.uint16:
      _save_png16(tmp, arr)
    else:
      Image.fromarray(arr).save(tmp, format="PNG")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _save_png16(tmp, arr):
  if arr.ndim == 2:
    Image.fromarray(arr).save(tmp, format="PNG")
    return
  # Pillow cannot write 16-bit RGB(A); write it with our own minimal PNG encoder (zlib + CRC chunks).
  import struct
  import zlib
  h, w, c = arr.shape
  color_type = {3: 2, 4: 6}[c]
  raw = arr.astype(">u2").reshape(h, w * c)
  rows = b"".join(b"\x00" + raw[i].tobytes() for i in range(h))

  def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

  with open(tmp, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n")
    f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)))
    f.write(chunk(b"IDAT", zlib.compress(rows, 6)))
    f.write(chunk(b"IEND", b""))


def encode_png(arr: np.ndarray) -> bytes:
  """PNG bytes of an 8-bit image (used for records)."""
  import io
  buf = io.BytesIO()
  Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def decode_png(data: bytes, where: str = "<bytes>") -> np.ndarray:
  import io
  try:
    with Image.open(io.BytesIO(data)) as im:
      return np.asarray(im.convert("RGB"))
  except Exception as e:
    raise ImageReadError(f"{where}: cannot decode PNG ({type(e).__name__}: {e})") from None
