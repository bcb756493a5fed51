"""Image IO: round trips at 8/16 bits, our PNG decoder on every filter type and Adam7, broken files."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from diffssr_jax import images


def _rand(shape, dtype, seed=0):
  return np.random.default_rng(seed).integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)


def _smooth(shape, dtype, seed=0):
  """Gradients plus noise, so the predictive filters see structured neighbours (and wrap-around)."""
  h, w = shape[:2]
  top = np.iinfo(dtype).max
  yy, xx = np.mgrid[:h, :w]
  base = (yy * 37 + xx * 53)[..., None] * (np.arange(shape[2]) + 1) if len(shape) == 3 else yy * 37 + xx * 53
  return ((base * (top // 300) + _rand(shape, dtype, seed) % 23) % (top + 1)).astype(dtype)


# ---------------------------------------------------------------- an independent test-side PNG encoder
def _filter_line(ftype, line, prev, bpp):
  """Forward PNG filter of one scanline (ints), straight from the spec, byte by byte."""
  out = []
  for i, x in enumerate(line):
    a = line[i - bpp] if i >= bpp else 0
    b = prev[i]
    c = prev[i - bpp] if i >= bpp else 0
    if ftype == 0:
      pred = 0
    elif ftype == 1:
      pred = a
    elif ftype == 2:
      pred = b
    elif ftype == 3:
      pred = (a + b) // 2
    else:
      p = a + b - c
      pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
      pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
    out.append((x - pred) % 256)
  return bytes([ftype] + out)


def _scanlines(img, filters):
  depth = 16 if img.dtype == np.uint16 else 8
  h, w, c = img.shape
  raw = img.astype(">u2") if depth == 16 else img
  lines = np.frombuffer(raw.tobytes(), np.uint8).reshape(h, -1).tolist()
  bpp = c * depth // 8
  prev = [0] * len(lines[0])
  out = b""
  for y, line in enumerate(lines):
    out += _filter_line(filters[y % len(filters)], line, prev, bpp)
    prev = line
  return out


def _png_bytes(img, filters=(0, 1, 2, 3, 4), interlace=False, chunk_split=7):
  """PNG bytes of an (H, W, C) uint8/uint16 image, rows filtered with `filters` cyclically, optionally Adam7,
  the zlib stream split over several IDAT chunks."""
  if img.ndim == 2:
    img = img[:, :, None]
  h, w, c = img.shape
  depth = 16 if img.dtype == np.uint16 else 8
  ctype = {1: 0, 2: 4, 3: 2, 4: 6}[c]
  if interlace:
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    data = b"".join(_scanlines(img[y0::dy, x0::dx], filters) for x0, y0, dx, dy in passes
                    if img[y0::dy, x0::dx].size)
  else:
    data = _scanlines(img, filters)
  return _container(data, w, h, depth, ctype, interlace, chunk_split)


def _chunk(tag, payload):
  return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def _container(scanlines, w, h, depth, ctype, interlace=False, chunk_split=7):
  """Signature, IHDR, the compressed scanlines over several IDAT chunks, IEND."""
  z = zlib.compress(scanlines)
  n = max(1, len(z) // chunk_split)
  idats = b"".join(_chunk(b"IDAT", z[i:i + n]) for i in range(0, len(z), n))
  ihdr = struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, int(interlace))
  return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + idats + _chunk(b"IEND", b"")


# ---------------------------------------------------------------- decoder
@pytest.mark.parametrize("interlace", [False, True])
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_test_encoder_agrees_with_pillow_8bit(channels, interlace, tmp_path):
  """Pillow decodes the test encoder's 8-bit files: the encoder (used for the 16-bit tests) is right."""
  img = _smooth((13, 11, channels), np.uint8, seed=channels)
  path = tmp_path / "x.png"
  path.write_bytes(_png_bytes(img, interlace=interlace))
  with Image.open(path) as im:
    got = np.asarray(im)
  np.testing.assert_array_equal(got.reshape(img.shape), img)
  # and our decoder reads the same bytes the same way
  ours, hdr = images.decode_png_array(path.read_bytes())
  assert hdr.bit_depth == 8 and ours.dtype == np.uint8
  np.testing.assert_array_equal(ours, img)


@pytest.mark.parametrize("ftype", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("channels", [3, 4])
def test_decoder_each_filter_16bit(ftype, channels):
  img = _smooth((9, 10, channels), np.uint16, seed=ftype)
  ours, hdr = images.decode_png_array(_png_bytes(img, filters=(ftype,)))
  assert hdr.bit_depth == 16 and ours.dtype == np.uint16
  np.testing.assert_array_equal(ours, img)


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 9, 3), (8, 1, 4), (17, 13, 3), (5, 3, 2)])
def test_decoder_adam7_16bit(shape):
  img = _rand(shape, np.uint16, seed=sum(shape))
  ours, hdr = images.decode_png_array(_png_bytes(img, interlace=True))
  assert hdr.interlace == 1
  np.testing.assert_array_equal(ours, img)


def test_load_image_16bit_rgb_filtered_and_interlaced(tmp_path):
  img = _smooth((12, 15, 3), np.uint16)
  for i, kw in enumerate([dict(filters=(1, 3, 4)), dict(interlace=True, filters=(4, 2))]):
    path = tmp_path / f"f{i}.png"
    path.write_bytes(_png_bytes(img, **kw))
    loaded = images.load_image(path)
    assert loaded.bits == 16 and loaded.source_mode == "RGB;16" and loaded.alpha is None
    np.testing.assert_array_equal(loaded.rgb, img)


def test_trns_colour_key_becomes_alpha():
  img = _rand((4, 5, 3), np.uint16, seed=3)
  img[1, 2] = img[3, 4] = (1, 2, 3)
  png = _png_bytes(img)
  end = png.index(b"IDAT") - 4
  trns = _chunk(b"tRNS", struct.pack(">HHH", 1, 2, 3))
  out, _ = images.decode_png_array(png[:end] + trns + png[end:])
  assert out.shape == (4, 5, 4)
  expect = np.full((4, 5), 65535, np.uint16)
  expect[1, 2] = expect[3, 4] = 0
  np.testing.assert_array_equal(out[..., 3], expect)


# ---------------------------------------------------------------- save_png / load_image round trips
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("channels", [None, 3, 4])
def test_save_load_round_trip(dtype, channels, tmp_path):
  shape = (11, 14) if channels is None else (11, 14, channels)
  img = _rand(shape, dtype, seed=channels or 1)
  path = tmp_path / "r.png"
  images.save_png(path, img)
  got = images.load_image(path)
  assert got.bits == (16 if dtype == np.uint16 else 8)
  assert got.rgb.dtype == dtype and got.rgb.shape == (11, 14, 3)
  if channels is None:
    np.testing.assert_array_equal(got.rgb, np.repeat(img[:, :, None], 3, axis=2))
    assert got.alpha is None
  else:
    np.testing.assert_array_equal(got.rgb, img[:, :, :3])
    if channels == 4:
      np.testing.assert_array_equal(got.alpha, img[:, :, 3])
    else:
      assert got.alpha is None


def test_read_rgb8_from_16bit_rounds_and_warns(tmp_path):
  img = np.array([[[0, 65535, 257 * 100], [128, 32896, 65000]]], np.uint16)
  images.save_png(tmp_path / "a.png", img)
  with pytest.warns(UserWarning, match="16-bit"):
    out = images.read_rgb8(tmp_path / "a.png")
  np.testing.assert_array_equal(out, np.round(img * (255 / 65535)).astype(np.uint8))


def test_save_png_no_overwrite(tmp_path):
  path = tmp_path / "a.png"
  images.save_png(path, np.zeros((2, 2, 3), np.uint8))
  with pytest.raises(FileExistsError):
    images.save_png(path, np.zeros((2, 2, 3), np.uint8), overwrite=False)


# ---------------------------------------------------------------- broken files
def test_truncated_16bit_png_names_path(tmp_path):
  img = _rand((20, 20, 3), np.uint16)
  path = tmp_path / "t16.png"
  images.save_png(path, img)
  data = path.read_bytes()
  for cut in (40, len(data) // 2, len(data) - 5):
    path.write_bytes(data[:cut])
    with pytest.raises(images.ImageReadError, match="t16.png"):
      images.load_image(path)


def test_corrupt_crc_and_zlib_16bit(tmp_path):
  img = _rand((6, 6, 3), np.uint16)
  good = _png_bytes(img, chunk_split=1)
  path = tmp_path / "c.png"
  i = good.index(b"IDAT") + 6
  path.write_bytes(good[:i] + bytes([good[i] ^ 0xFF]) + good[i + 1:])
  with pytest.raises(images.ImageReadError, match="c.png.*CRC"):
    images.load_image(path)
  # a valid chunk whose zlib stream is garbage
  body = b"not zlib at all"
  bad = _chunk(b"IDAT", body)
  head = good[:good.index(b"IDAT") - 4]
  path.write_bytes(head + bad + good[-12:])
  with pytest.raises(images.ImageReadError, match="c.png.*zlib"):
    images.load_image(path)


def test_bad_filter_type_raises():
  lines = bytearray(_scanlines(_rand((3, 4, 3), np.uint16), (0,)))
  lines[0] = 9  # the first line's filter-type byte
  with pytest.raises(images.ImageReadError, match="here.png.*filter type 9"):
    images.decode_png_array(_container(bytes(lines), 4, 3, 16, 2), "here.png")


def test_short_image_data_raises():
  lines = _scanlines(_rand((3, 4, 3), np.uint16), (0,))
  with pytest.raises(images.ImageReadError, match="here.png.*truncated"):
    images.decode_png_array(_container(lines[:-3], 4, 3, 16, 2), "here.png")


@pytest.mark.parametrize("content", [b"", b"garbage, not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 30])
def test_garbage_file_raises_naming_path(content, tmp_path):
  path = tmp_path / "junk.png"
  path.write_bytes(content)
  with pytest.raises(images.ImageReadError, match="junk.png"):
    images.load_image(path)


def test_truncated_8bit_png_names_path(tmp_path):
  path = tmp_path / "t8.png"
  images.save_png(path, _rand((30, 30, 3), np.uint8))
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(images.ImageReadError, match="t8.png"):
    images.load_image(path)


def test_missing_file(tmp_path):
  with pytest.raises(images.ImageReadError, match="nope.png"):
    images.load_image(tmp_path / "nope.png")
