"""Reading and writing image files (numpy + Pillow only: no jax, usable by the torch-only tools).

Every reader names the file in its error, and writers go through a temporary file and a rename so an
interrupted write never leaves a truncated PNG where a good one was expected.
"""
from __future__ import annotations

import dataclasses
import pathlib
import warnings

import numpy as np
from PIL import Image

from diffssr_jax import fileio

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
  if _is_png16_colour(path):
    # Pillow decodes 16-bit RGB(A) / grey+alpha PNGs to 8 bits; our decoder keeps all 16.
    return _load_png16(path)
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
  if im.source_mode in ("L", "LA", "1", "I", "I;16", "I;16B", "F", "LA;16"):
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
  with fileio.atomic_path(path) as tmp:
    if arr.dtype == np.uint16:
      _save_png16(tmp, arr)
    else:
      Image.fromarray(arr).save(tmp, format="PNG")


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


# ---------------------------------------------------------------- PNG decoding (ours, for 16-bit colour)
# PNG (ISO/IEC 15948, W3C PNG 2nd ed.): 8-byte signature, then chunks `length(4, big-endian) type(4) data crc(4)`;
# IHDR first; the IDAT chunks concatenated form one zlib stream of filtered scanlines, each prefixed by a
# filter-type byte (0 None, 1 Sub, 2 Up, 3 Average, 4 Paeth); samples are big-endian.

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel (palette images are not handled)
_PNG_MODES = {0: "L", 2: "RGB", 4: "LA", 6: "RGBA"}
# Adam7 passes as (x0, y0, dx, dy) (PNG spec section 8.2).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


@dataclasses.dataclass(frozen=True)
class PngHeader:
  """The IHDR fields we need."""
  width: int
  height: int
  bit_depth: int
  colour_type: int
  interlace: int


def _png_ihdr(head: bytes) -> PngHeader | None:
  """The header of PNG bytes starting with the signature and IHDR, or None when they are not a PNG."""
  import struct
  if len(head) < 33 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
    return None
  w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", head[16:29])
  return PngHeader(w, h, depth, ctype, interlace)


def _is_png16_colour(path) -> bool:
  """Whether `path` is a 16-bit PNG with colour or alpha (the layouts Pillow truncates to 8 bits)."""
  try:
    with open(path, "rb") as f:
      hdr = _png_ihdr(f.read(33))
  except OSError:
    return False  # let the Pillow path report it
  return hdr is not None and hdr.bit_depth == 16 and hdr.colour_type in (2, 4, 6)


def _png_chunks(data: bytes, where: str):
  """(type, payload) of every chunk, verifying lengths and CRCs, up to IEND."""
  import struct
  import zlib
  pos = 8
  while True:
    if pos + 8 > len(data):
      raise ImageReadError(f"{where}: PNG truncated (no IEND chunk)")
    (length,) = struct.unpack(">I", data[pos:pos + 4])
    tag = data[pos + 4:pos + 8]
    end = pos + 8 + length
    if end + 4 > len(data):
      raise ImageReadError(f"{where}: PNG truncated inside a {tag!r} chunk")
    payload = data[pos + 8:end]
    (crc,) = struct.unpack(">I", data[end:end + 4])
    if zlib.crc32(tag + payload) & 0xFFFFFFFF != crc:
      raise ImageReadError(f"{where}: PNG chunk {tag!r} has a bad CRC (corrupt file)")
    yield tag, payload
    if tag == b"IEND":
      return
    pos = end + 4


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
  """The Paeth predictor (PNG spec 9.4): whichever of left a, up b, upper-left c is nearest a + b - c,
  ties resolved in the order a, b, c. Inputs int arrays."""
  p = a + b - c
  pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
  return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _unfilter_row(ftype: int, raw: np.ndarray, prev: np.ndarray, bpp: int, where: str) -> np.ndarray:
  """One reconstructed scanline (uint8) from its filtered bytes `raw` and the previous reconstructed `prev`
  (zeros for the first line). `bpp` is the byte distance to the corresponding byte of the left pixel."""
  if ftype == 0:
    return raw
  if ftype == 2:
    return raw + prev  # uint8 arithmetic wraps mod 256, as the spec's reconstruction does
  if ftype == 1:
    # Sub: out[i] = raw[i] + out[i - bpp] is a running sum along each byte lane, mod 256.
    lanes = np.cumsum(raw.reshape(-1, bpp).astype(np.uint32), axis=0)
    return (lanes & 0xFF).astype(np.uint8).reshape(-1)
  if ftype not in (3, 4):
    raise ImageReadError(f"{where}: PNG scanline has unknown filter type {ftype}")
  # Average and Paeth depend non-linearly on the reconstructed left pixel: walk the pixels, vectorised over
  # the bytes of one pixel (~3-6 us per pixel: seconds for a multi-megapixel Paeth-filtered image).
  r = raw.reshape(-1, bpp).astype(np.int32)
  up = prev.reshape(-1, bpp).astype(np.int32)
  out = np.empty_like(r)
  left = np.zeros(bpp, np.int32)
  upleft = np.zeros(bpp, np.int32)
  for i in range(r.shape[0]):
    if ftype == 3:
      pred = (left + up[i]) >> 1
    else:
      pred = _paeth(left, up[i], upleft)
    left = (r[i] + pred) & 0xFF
    out[i] = left
    upleft = up[i]
  return out.astype(np.uint8).reshape(-1)


def _unfilter(stream: bytes, pos: int, width: int, height: int, spp: int, depth: int,
              where: str) -> tuple[np.ndarray, int]:
  """Reconstructs a (height, width, spp) sub-image starting at byte `pos` of the inflated stream; returns the
  samples (uint8 or big-endian-decoded uint16) and the position after it."""
  bpp = spp * depth // 8
  stride = width * bpp
  need = height * (stride + 1)
  if pos + need > len(stream):
    raise ImageReadError(f"{where}: PNG image data is truncated ({len(stream) - pos} of {need} bytes)")
  rows = np.frombuffer(stream, np.uint8, need, pos).reshape(height, stride + 1)
  out = np.empty((height, stride), np.uint8)
  prev = np.zeros(stride, np.uint8)
  for y in range(height):
    prev = out[y] = _unfilter_row(int(rows[y, 0]), rows[y, 1:], prev, bpp, where)
  if depth == 16:
    samples = out.view(">u2").astype(np.uint16)
  else:
    samples = out
  return samples.reshape(height, width, spp), pos + need


def decode_png_array(data: bytes, where: str = "<bytes>") -> tuple[np.ndarray, PngHeader]:
  """Decodes non-palette 8- or 16-bit PNG bytes to an (H, W, channels) uint8/uint16 array (channels 1-4:
  grey, grey+alpha, RGB, RGBA, as stored; a tRNS colour key adds an alpha channel), with Adam7 interlacing,
  verifying CRCs. Raises ImageReadError."""
  import zlib
  hdr = _png_ihdr(data)
  if hdr is None:
    raise ImageReadError(f"{where}: not a PNG file (bad signature or no IHDR)")
  if hdr.colour_type not in _PNG_CHANNELS or hdr.bit_depth not in (8, 16):
    raise ImageReadError(f"{where}: PNG colour type {hdr.colour_type} at {hdr.bit_depth} bits is not handled")
  if hdr.width == 0 or hdr.height == 0:
    raise ImageReadError(f"{where}: empty image")
  if hdr.interlace not in (0, 1):
    raise ImageReadError(f"{where}: unknown PNG interlace method {hdr.interlace}")
  idat, trns = [], None
  for tag, payload in _png_chunks(data, where):
    if tag == b"IDAT":
      idat.append(payload)
    elif tag == b"tRNS":
      trns = payload
  try:
    stream = zlib.decompress(b"".join(idat))
  except zlib.error as e:
    raise ImageReadError(f"{where}: PNG image data is corrupt (zlib: {e})") from None
  spp = _PNG_CHANNELS[hdr.colour_type]
  dtype = np.uint16 if hdr.bit_depth == 16 else np.uint8
  if hdr.interlace == 0:
    img, _ = _unfilter(stream, 0, hdr.width, hdr.height, spp, hdr.bit_depth, where)
  else:
    img = np.empty((hdr.height, hdr.width, spp), dtype)
    pos = 0
    for x0, y0, dx, dy in _ADAM7:
      pw, ph = -(-(hdr.width - x0) // dx), -(-(hdr.height - y0) // dy)
      if pw <= 0 or ph <= 0:
        continue  # empty passes have no scanlines at all
      sub, pos = _unfilter(stream, pos, pw, ph, spp, hdr.bit_depth, where)
      img[y0::dy, x0::dx] = sub
  if trns is not None and spp in (1, 3) and len(trns) == 2 * spp:
    # tRNS for grey/RGB names one fully transparent colour (2-byte samples); everything else is opaque.
    key = np.frombuffer(trns, ">u2").astype(dtype)
    alpha = np.where(np.all(img == key, axis=2), 0, np.iinfo(dtype).max).astype(dtype)
    img = np.concatenate([img, alpha[:, :, None]], axis=2)
  return img, hdr


def _load_png16(path: str) -> LoadedImage:
  """A 16-bit colour PNG through our decoder, as a LoadedImage (mode names like Pillow's plus ';16')."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise ImageReadError(f"{path}: file not found") from None
  arr, hdr = decode_png_array(data, path)
  spp = arr.shape[2]
  mode = _PNG_MODES[{1: 0, 2: 4, 3: 2, 4: 6}[spp]] + ";16"
  if spp in (1, 2):
    rgb = np.repeat(arr[:, :, :1], 3, axis=2)
  else:
    rgb = arr[:, :, :3]
  alpha = arr[:, :, spp - 1].copy() if spp in (2, 4) else None
  return LoadedImage(np.ascontiguousarray(rgb), alpha, 16, path, mode)
