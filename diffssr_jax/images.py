"""Reading and writing image files with OpenCV (numpy + cv2 only: no jax, usable by the torch-only tools).

Why OpenCV (`opencv-python-headless`): one maintained library, wrapping libpng, libjpeg-turbo, libtiff and
libwebp, that reads and writes PNG at 8 and 16 bits in every layout (grey, grey+alpha, RGB, RGBA, palette)
and reads JPEG, BMP, TIFF (16-bit RGB too) and WebP, at C speed. The alternatives each miss a case: Pillow
reduces 16-bit RGB(A) to 8 bits, imageio reads PNG through Pillow, and pypng is pure Python (seconds per
2K image, PNG only). OpenCV's quirks are handled here, in one place:
  * it orders channels BGR(A): reversed on the way in and out;
  * a failed decode returns None: we read the bytes ourselves, so every error names the file;
  * it expands grey+alpha PNGs to four channels: four decoded channels whose colour channels are all equal
    are reported as grey+alpha ("LA"), the only way to tell them apart after decoding (an RGBA file with
    no colour looks the same, and is equally colourless).

Writers encode in memory and go through `fileio.atomic_write` (temporary file + rename), so an interrupted
write never leaves a truncated PNG where a good one was expected.

Pillow is used here, and only here among the package's image readers, for what OpenCV cannot do: read a file's
header without decoding its pixels (`header_hw`: sizes checked before any model runs), its EXIF orientation
(`exif_orientation`) and a PNG's text chunks (`png_text`: OpenCV's decoder drops them). (segment-anything's
own API takes Pillow images: data/torchvision_fallback.py.)
"""
from __future__ import annotations

import dataclasses
import pathlib
import warnings

import cv2
import numpy as np

from diffssr_jax import fileio, storage
from diffssr_jax.conventions import GREY_MODES

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_EXPECTED = "truncated, corrupt, or not a PNG, JPEG, BMP, TIFF or WebP image"


class ImageReadError(ValueError):
  """An image file could not be read; the message names the file and the problem."""


@dataclasses.dataclass
class LoadedImage:
  """An image as stored: `rgb` (H, W, 3) uint8 or uint16, optional `alpha` (H, W) of the same dtype.

  `source_mode` is the stored layout in Pillow's names: "L" (grey, replicated into `rgb`), "LA", "RGB"
  or "RGBA"; palette images load as "RGB" or, with transparency, "RGBA". `bits` gives the depth.
  """
  rgb: np.ndarray
  alpha: np.ndarray | None
  bits: int  # 8 or 16
  path: str
  source_mode: str

  @property
  def grey(self) -> bool:
    """Whether the source has no colour (callers write such images back as greyscale)."""
    return self.source_mode in GREY_MODES


def list_images(root) -> list[pathlib.Path]:
  """All image files below `root` (a file or a folder, local or in a bucket), sorted, recursing into
  subfolders."""
  root = storage.native(root)
  if root.is_file():
    return [root]
  if not root.is_dir():
    raise FileNotFoundError(f"{root}: no such file or folder")
  if storage.is_remote(root):  # a bucket folder is walked (epath refuses ** globs there)
    return [root / rel for rel in storage.files_below(root)
            if pathlib.PurePosixPath(rel).suffix.lower() in IMAGE_EXTENSIONS]
  return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _pixels(arr: np.ndarray, where: str) -> tuple[np.ndarray, int]:
  """Decoded samples as uint8 or uint16, and their bit depth."""
  if arr.dtype == np.uint8:
    return arr, 8
  if arr.dtype == np.uint16:
    return arr, 16
  if arr.dtype in (np.int16, np.int32, np.uint32):  # integer TIFFs: clipped to the 16-bit range
    return np.clip(arr, 0, 65535).astype(np.uint16), 16
  if arr.dtype.kind == "f":  # float TIFFs hold [0, 1]
    return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), 8
  raise ImageReadError(f"{where}: unsupported pixel type {arr.dtype}")


# EXIF orientation (tag 274): how a camera's pixels must be turned to show the picture upright. OpenCV's
# IMREAD_UNCHANGED (the only mode that keeps 16 bits and alpha) ignores it, so a phone photo decoded
# sideways; the tag is read with Pillow (header only) and applied here. Policy, set once per command
# (`--exif_orientation`): "apply" (default) turns the pixels upright, "ignore" keeps them as stored and
# warns once per image.
EXIF_ORIENTATION_POLICIES = ("apply", "ignore")
_exif_policy = ["apply"]
_ORIENT = {  # orientation -> the numpy transform of an (H, W, ...) array that makes it upright
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: np.swapaxes(a, 0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1)}


def set_exif_orientation(policy: str) -> None:
  """"apply" or "ignore" (see above) for every image decoded from now on in this process."""
  if policy not in EXIF_ORIENTATION_POLICIES:
    raise ValueError(f"EXIF orientation policy must be one of {EXIF_ORIENTATION_POLICIES}, got {policy!r}")
  _exif_policy[0] = policy


def exif_orientation(data: bytes) -> int:
  """The EXIF orientation of image file bytes (1, upright, when there is none or it cannot be read)."""
  import io
  from PIL import Image
  try:
    with Image.open(io.BytesIO(data)) as im:
      value = int(im.getexif().get(0x0112, 1))
  except Exception:  # noqa: BLE001 - no or unreadable EXIF: the pixels are taken as stored
    return 1
  return value if value in _ORIENT else 1


def _open_header(path):
  """A Pillow image of `path` (local or remote) with only its header read, as a context manager."""
  from PIL import Image
  path = str(path)
  f = storage.path(path).open("rb") if storage.is_remote(path) else open(path, "rb")
  try:
    return Image.open(f)  # closes `f` when the image is closed
  except BaseException:
    f.close()
    raise


def header_hw(path) -> tuple[int, int]:
  """(height, width) of an image file from its header, without decoding the pixels; ImageReadError naming
  the file when it is missing or not an image."""
  try:
    with _open_header(path) as im:
      w, h = im.size
  except FileNotFoundError:
    raise ImageReadError(f"{path}: file not found") from None
  except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for broken files
    raise ImageReadError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
  return h, w


def png_text(path) -> dict[str, str]:
  """The tEXt/iTXt metadata of a PNG file ({} for other or unreadable files)."""
  try:
    with _open_header(path) as im:
      return dict(getattr(im, "text", {}) or {}) if im.format == "PNG" else {}
  except Exception:  # noqa: BLE001  (anything unreadable has no metadata)
    return {}


def _upright(rgb, alpha, data: bytes, where: str):
  orientation = exif_orientation(data)
  if orientation == 1:
    return rgb, alpha
  if _exif_policy[0] == "ignore":
    warnings.warn(f"{where}: EXIF orientation {orientation} ignored (--exif_orientation ignore): the image is "
                  "used as stored, possibly rotated or mirrored", stacklevel=4)
    return rgb, alpha
  turn = _ORIENT[orientation]
  return np.ascontiguousarray(turn(rgb)), None if alpha is None else np.ascontiguousarray(turn(alpha))


def decode_image(data: bytes, where: str = "<bytes>") -> LoadedImage:
  """Decodes image file bytes keeping their bit depth (8 or 16) and alpha; `where` names them in errors.
  An EXIF orientation is applied (or, by policy, ignored with a warning: `set_exif_orientation`)."""
  if not len(data):
    raise ImageReadError(f"{where}: empty file")
  try:
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  except cv2.error as e:
    raise ImageReadError(f"{where}: cannot decode image ({' '.join(str(e).split())})") from None
  if arr is None:
    raise ImageReadError(f"{where}: cannot decode image ({_EXPECTED})")
  arr, bits = _pixels(arr, where)
  if arr.ndim == 3 and arr.shape[2] == 1:
    arr = arr[:, :, 0]
  if arr.size == 0:
    raise ImageReadError(f"{where}: empty image")
  alpha = None
  if arr.ndim == 2:
    mode, rgb = "L", np.repeat(arr[:, :, None], 3, axis=2)
  elif arr.shape[2] == 2:  # grey + alpha (TIFF)
    mode, rgb, alpha = "LA", np.repeat(arr[:, :, :1], 3, axis=2), arr[:, :, 1].copy()
  elif arr.shape[2] == 3:
    mode, rgb = "RGB", np.ascontiguousarray(arr[:, :, ::-1])
  elif arr.shape[2] == 4:
    b, g, r = arr[:, :, 0], arr[:, :, 1], arr[:, :, 2]
    mode = "LA" if np.array_equal(b, g) and np.array_equal(g, r) else "RGBA"
    rgb, alpha = np.ascontiguousarray(arr[:, :, 2::-1]), arr[:, :, 3].copy()
  else:
    raise ImageReadError(f"{where}: unsupported image layout {arr.shape}")
  rgb, alpha = _upright(rgb, alpha, data, where)
  return LoadedImage(rgb, alpha, bits, where, mode)


def load_image(path) -> LoadedImage:
  """Reads an image file keeping its bit depth (8 or 16) and alpha channel."""
  path = str(path)
  try:
    with (storage.path(path).open("rb") if storage.is_remote(path) else open(path, "rb")) as f:
      data = f.read()
  except FileNotFoundError:
    raise ImageReadError(f"{path}: file not found") from None
  except OSError as e:
    raise ImageReadError(f"{path}: cannot read file ({e.strerror or e})") from None
  return decode_image(data, path)


def to_uint8(arr: np.ndarray) -> np.ndarray:
  """16-bit to 8-bit by rounding (x * 255 / 65535); 8-bit unchanged."""
  if arr.dtype == np.uint8:
    return arr
  return np.round(arr.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)


def as_rgb8(image: LoadedImage, warn: bool = True, stacklevel: int = 2) -> np.ndarray:
  """A loaded image as (H, W, 3) uint8 RGB; warns (naming `image.path`) when greyscale, alpha or 16 bits
  are dropped."""
  notes = []
  if image.grey:
    notes.append(f"greyscale ({image.source_mode}) replicated to RGB")
  if image.alpha is not None:
    notes.append("alpha channel dropped")
  if image.bits == 16:
    notes.append("16-bit converted to 8-bit")
  if warn and notes:
    warnings.warn(f"{image.path}: " + "; ".join(notes), stacklevel=stacklevel + 1)
  return to_uint8(image.rgb)


def read_rgb8(path, warn: bool = True) -> np.ndarray:
  """Reads any supported image as (H, W, 3) uint8 RGB; warns when greyscale, alpha or 16-bit is dropped."""
  return as_rgb8(load_image(path), warn, stacklevel=2)


def encode_png(arr: np.ndarray, compression: int = 6) -> bytes:
  """PNG bytes of an (H, W), (H, W, 3) or (H, W, 4) uint8/uint16 array (RGB(A) order), zlib level
  `compression` (0-9)."""
  arr = np.asarray(arr)
  if arr.dtype not in (np.uint8, np.uint16):
    raise TypeError(f"PNG takes uint8 or uint16 samples, got {arr.dtype}")
  if arr.ndim == 3 and arr.shape[2] in (3, 4):
    arr = arr[:, :, [2, 1, 0, 3][:arr.shape[2]]]  # RGB(A) -> OpenCV's BGR(A)
  elif arr.ndim != 2:
    raise ValueError(f"PNG takes (H, W), (H, W, 3) or (H, W, 4) arrays, got {arr.shape}")
  if arr.size == 0:
    raise ValueError(f"cannot write an empty {arr.shape} image")
  ok, buf = cv2.imencode(".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, int(compression)])
  if not ok:
    raise ValueError(f"OpenCV could not encode a {arr.shape} {arr.dtype} PNG")
  return buf.tobytes()


def save_png(path, arr: np.ndarray, overwrite: bool = True) -> None:
  """Writes an (H, W), (H, W, 3) or (H, W, 4) uint8/uint16 array as PNG, atomically (temp file + rename; a
  bucket object in one upload)."""
  path = storage.path(path)
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path}: exists (pass overwrite to replace it)")
  arr = np.asarray(arr)
  if arr.dtype not in (np.uint8, np.uint16):
    raise TypeError(f"{path}: save_png takes uint8 or uint16, got {arr.dtype}")
  try:
    data = encode_png(arr)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  fileio.atomic_write(path, data)


def decode_png(data: bytes, where: str = "<bytes>") -> np.ndarray:
  """(H, W, 3) uint8 RGB of encoded image bytes (the tiles of training records); raises ImageReadError."""
  return to_uint8(decode_image(data, where).rgb)

