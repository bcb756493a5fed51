"""Image IO through OpenCV: every PNG layout at 8 and 16 bits (from an independent test-side encoder),
palette, JPEG, BMP, TIFF, WebP, writes checked by Pillow, atomic writes, broken files."""
import os
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
# Pillow cannot write 16-bit colour PNGs, so the 16-bit reading tests build their files here, straight from
# the PNG spec (checked against Pillow at 8 bits below).
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


def _png_bytes(img, filters=(0, 1, 2, 3, 4), interlace=False, chunk_split=7, extra=b""):
  """PNG bytes of an (H, W, C) uint8/uint16 image, rows filtered with `filters` cyclically, optionally Adam7,
  the zlib stream split over several IDAT chunks; `extra` chunks go before the image data."""
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
  z = zlib.compress(data)
  n = max(1, len(z) // chunk_split)
  idats = b"".join(_chunk(b"IDAT", z[i:i + n]) for i in range(0, len(z), n))
  ihdr = struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, int(interlace))
  return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + idats + _chunk(b"IEND", b"")


def _chunk(tag, payload):
  return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def _check_loaded(loaded, img):
  """`loaded` holds `img` (H, W, 1-4 channels as stored: grey, grey+alpha, RGB, RGBA) exactly."""
  c = img.shape[2]
  assert loaded.bits == img.dtype.itemsize * 8 and loaded.rgb.dtype == img.dtype
  assert loaded.source_mode == {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[c]
  assert loaded.grey == (c <= 2)
  colour = img[:, :, :3] if c >= 3 else np.repeat(img[:, :, :1], 3, axis=2)
  np.testing.assert_array_equal(loaded.rgb, colour)
  if c in (2, 4):
    np.testing.assert_array_equal(loaded.alpha, img[:, :, c - 1])
  else:
    assert loaded.alpha is None


# ---------------------------------------------------------------- PNG reading, every layout
@pytest.mark.parametrize("interlace", [False, True])
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_test_encoder_agrees_with_pillow_8bit(channels, interlace, tmp_path):
  """Pillow decodes the test encoder's 8-bit files (so the encoder used for the 16-bit tests is right), and
  load_image reads the same bytes the same way."""
  img = _smooth((13, 11, channels), np.uint8, seed=channels)
  path = tmp_path / "x.png"
  path.write_bytes(_png_bytes(img, interlace=interlace))
  with Image.open(path) as im:
    got = np.asarray(im)
  np.testing.assert_array_equal(got.reshape(img.shape), img)
  _check_loaded(images.load_image(path), img)


@pytest.mark.parametrize("ftype", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16bit_png_every_layout_and_filter(ftype, channels, tmp_path):
  img = _smooth((9, 10, channels), np.uint16, seed=ftype)
  path = tmp_path / "d.png"
  path.write_bytes(_png_bytes(img, filters=(ftype,)))
  _check_loaded(images.load_image(path), img)


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 9, 3), (8, 1, 4), (17, 13, 3), (5, 3, 2)])
def test_16bit_png_adam7(shape, tmp_path):
  img = _rand(shape, np.uint16, seed=sum(shape))
  path = tmp_path / "i.png"
  path.write_bytes(_png_bytes(img, interlace=True))
  _check_loaded(images.load_image(path), img)


def test_trns_colour_key_becomes_alpha(tmp_path):
  img = _rand((4, 5, 3), np.uint16, seed=3)
  img[1, 2] = img[3, 4] = (1, 2, 3)
  path = tmp_path / "k.png"
  path.write_bytes(_png_bytes(img, extra=_chunk(b"tRNS", struct.pack(">HHH", 1, 2, 3))))
  loaded = images.load_image(path)
  assert loaded.source_mode == "RGBA" and loaded.bits == 16
  np.testing.assert_array_equal(loaded.rgb, img)
  expect = np.full((4, 5), 65535, np.uint16)
  expect[1, 2] = expect[3, 4] = 0
  np.testing.assert_array_equal(loaded.alpha, expect)


@pytest.mark.parametrize("transparency", [None, 2])
def test_palette_png(transparency, tmp_path):
  idx = _rand((7, 9), np.uint8, seed=5) % 4
  im = Image.fromarray(idx, "P")
  im.putpalette([10, 20, 30, 200, 0, 0, 0, 255, 0, 1, 2, 250])
  path = tmp_path / "p.png"
  im.save(path, **({} if transparency is None else {"transparency": transparency}))
  loaded = images.load_image(path)
  with Image.open(path) as ref:
    want = np.asarray(ref.convert("RGBA"))
  np.testing.assert_array_equal(loaded.rgb, want[:, :, :3])
  if transparency is None:
    assert loaded.alpha is None and loaded.source_mode == "RGB"
  else:
    assert loaded.source_mode == "RGBA"
    np.testing.assert_array_equal(loaded.alpha, np.where(idx == 2, 0, 255))


def test_one_bit_png_is_grey_0_255(tmp_path):
  bits = _rand((6, 11), np.uint8, seed=2) > 127
  Image.fromarray(bits).save(tmp_path / "b.png")
  loaded = images.load_image(tmp_path / "b.png")
  assert loaded.grey and loaded.bits == 8
  np.testing.assert_array_equal(loaded.rgb[:, :, 1], bits.astype(np.uint8) * 255)


# ---------------------------------------------------------------- other formats
def _pillow_file(tmp_path, name, arr, mode=None, **kw):
  path = tmp_path / name
  Image.fromarray(arr, mode).save(path, **kw)
  return path


@pytest.mark.parametrize("name,kw", [("x.bmp", {}), ("x.tif", {}), ("x.webp", {"lossless": True})])
def test_lossless_formats_exact(name, kw, tmp_path):
  img = _smooth((12, 17, 3), np.uint8)
  _check_loaded(images.load_image(_pillow_file(tmp_path, name, img, **kw)), img)


def test_webp_with_alpha(tmp_path):
  img = _smooth((12, 17, 4), np.uint8, seed=4)
  _check_loaded(images.load_image(_pillow_file(tmp_path, "a.webp", img, lossless=True, exact=True)), img)


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_matches_pillow(channels, tmp_path):
  img = _smooth((24, 32, channels), np.uint8, seed=9)[:, :, :channels]
  path = _pillow_file(tmp_path, "j.jpg", img[:, :, 0] if channels == 1 else img, quality=95)
  with Image.open(path) as im:
    want = np.asarray(im)
  loaded = images.load_image(path)
  assert loaded.grey == (channels == 1) and loaded.bits == 8
  # Both use libjpeg(-turbo); allow the rounding differences of two builds, not a channel swap.
  got = loaded.rgb[:, :, 0] if channels == 1 else loaded.rgb
  assert np.abs(got.astype(int) - want.astype(int)).max() <= 2


def test_tiff_16bit_grey_and_float(tmp_path):
  deep = _smooth((10, 7), np.uint16, seed=1)
  loaded = images.load_image(_pillow_file(tmp_path, "g.tif", deep))
  assert loaded.bits == 16 and loaded.grey
  np.testing.assert_array_equal(loaded.rgb[:, :, 2], deep)
  f = np.linspace(-0.5, 1.5, 70, dtype=np.float32).reshape(7, 10)
  loaded = images.load_image(_pillow_file(tmp_path, "f.tif", f, "F"))
  assert loaded.bits == 8
  np.testing.assert_array_equal(loaded.rgb[:, :, 0], (np.clip(f, 0, 1) * 255 + 0.5).astype(np.uint8))


def test_tiff_16bit_rgb(tmp_path):
  tifffile = pytest.importorskip("tifffile")
  img = _smooth((6, 9, 3), np.uint16, seed=8)
  tifffile.imwrite(tmp_path / "c.tif", img, photometric="rgb")
  _check_loaded(images.load_image(tmp_path / "c.tif"), img)


# ---------------------------------------------------------------- save_png / load_image round trips
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("channels", [None, 3, 4])
def test_save_load_round_trip(dtype, channels, tmp_path):
  shape = (11, 14) if channels is None else (11, 14, channels)
  img = _rand(shape, dtype, seed=channels or 1)
  path = tmp_path / "r.png"
  images.save_png(path, img)
  _check_loaded(images.load_image(path), img if channels else img[:, :, None])


@pytest.mark.parametrize("channels", [None, 3, 4])
def test_written_png_read_by_pillow(channels, tmp_path):
  """Pillow, an independent decoder, sees the channels in order: 8 bits exactly, 16-bit grey exactly, and
  16-bit colour as its high bytes (Pillow's own reduction); the header says 16 bits."""
  shape = (5, 8) if channels is None else (5, 8, channels)
  for dtype in (np.uint8, np.uint16):
    img = _rand(shape, dtype, seed=7)
    path = tmp_path / f"w{np.dtype(dtype).itemsize}.png"
    images.save_png(path, img)
    head = path.read_bytes()[:29]
    assert head[12:16] == b"IHDR" and head[24] == img.dtype.itemsize * 8
    assert head[25] == {None: 0, 3: 2, 4: 6}[channels]
    with Image.open(path) as im:
      got = np.asarray(im)
    want = img if dtype == np.uint8 or channels is None else (img >> 8).astype(np.uint8)
    np.testing.assert_array_equal(got, want)


def test_read_rgb8_from_16bit_rounds_and_warns(tmp_path):
  img = np.array([[[0, 65535, 257 * 100], [128, 32896, 65000]]], np.uint16)
  images.save_png(tmp_path / "a.png", img)
  with pytest.warns(UserWarning, match="16-bit"):
    out = images.read_rgb8(tmp_path / "a.png")
  np.testing.assert_array_equal(out, np.round(img * (255 / 65535)).astype(np.uint8))


def test_read_rgb8_notes(tmp_path):
  grey = _smooth((6, 6), np.uint8)
  path = tmp_path / "la.png"
  path.write_bytes(_png_bytes(np.dstack([grey, grey[::-1]])))
  with pytest.warns(UserWarning, match=r"la\.png: greyscale \(LA\) replicated to RGB; alpha channel dropped"):
    out = images.read_rgb8(path)
  np.testing.assert_array_equal(out, np.repeat(grey[:, :, None], 3, axis=2))
  images.save_png(tmp_path / "rgb.png", _smooth((6, 6, 3), np.uint8))
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a plain 8-bit RGB file converts silently
    images.read_rgb8(tmp_path / "rgb.png")


def test_grey_of_hand_built_images():
  rgb = np.zeros((2, 2, 3), np.uint8)
  assert images.LoadedImage(rgb, None, 16, "mem", "I;16").grey
  assert not images.LoadedImage(rgb, None, 8, "mem", "RGB").grey


def test_decode_png_gives_rgb8():
  img = _rand((4, 6, 3), np.uint8, seed=11)
  np.testing.assert_array_equal(images.decode_png(images.encode_png(img, 1)), img)
  np.testing.assert_array_equal(images.decode_png(images.encode_png(img[:, :, 0])),
                                np.repeat(img[:, :, :1], 3, axis=2))


def test_save_png_no_overwrite(tmp_path):
  path = tmp_path / "a.png"
  images.save_png(path, np.zeros((2, 2, 3), np.uint8))
  with pytest.raises(FileExistsError):
    images.save_png(path, np.zeros((2, 2, 3), np.uint8), overwrite=False)


def test_save_png_rejects_bad_arrays_naming_path(tmp_path):
  with pytest.raises(TypeError, match=r"f\.png: .*float32"):
    images.save_png(tmp_path / "f.png", np.zeros((2, 2, 3), np.float32))
  with pytest.raises(ValueError, match=r"two\.png: .*\(2, 2, 2\)"):
    images.save_png(tmp_path / "two.png", np.zeros((2, 2, 2), np.uint8))
  assert not list(tmp_path.iterdir())


def test_save_png_is_atomic(tmp_path, monkeypatch):
  """A write that fails at the rename leaves the old file whole and no temporary file behind."""
  path = tmp_path / "keep.png"
  old = _rand((3, 4, 3), np.uint8)
  images.save_png(path, old)
  before = path.read_bytes()

  def broken_replace(src, dst):
    raise OSError("disk gone")
  monkeypatch.setattr(os, "replace", broken_replace)
  with pytest.raises(OSError, match="disk gone"):
    images.save_png(path, _rand((30, 40, 3), np.uint16))
  monkeypatch.undo()
  assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["keep.png"]


# ---------------------------------------------------------------- broken files
def _raises_one_line(path):
  with pytest.raises(images.ImageReadError) as e:
    images.load_image(path)
  msg = str(e.value)
  assert msg.startswith(str(path) + ": ") and "\n" not in msg
  return msg


def test_truncated_pngs_name_path(tmp_path):
  for dtype in (np.uint8, np.uint16):
    path = tmp_path / f"t{np.dtype(dtype).itemsize * 8}.png"
    images.save_png(path, _rand((30, 30, 3), dtype))
    data = path.read_bytes()
    for cut in (40, len(data) // 2, len(data) - 5):
      path.write_bytes(data[:cut])
      assert "cannot decode image" in _raises_one_line(path)


def test_truncated_jpeg_names_path(tmp_path):
  path = _pillow_file(tmp_path, "t.jpg", _rand((40, 40, 3), np.uint8))
  path.write_bytes(path.read_bytes()[:-300])
  _raises_one_line(path)


def test_corrupt_png_data(tmp_path):
  good = _png_bytes(_rand((6, 6, 3), np.uint16), chunk_split=1)
  path = tmp_path / "c.png"
  i = good.index(b"IDAT")
  crc_at = i + 4 + struct.unpack(">I", good[i - 4:i])[0]
  path.write_bytes(good[:crc_at] + bytes([good[crc_at] ^ 0xFF]) + good[crc_at + 1:])  # bad CRC
  _raises_one_line(path)
  payload = b"not zlib at all"
  path.write_bytes(good[:i - 4] + _chunk(b"IDAT", payload) + good[-12:])  # valid chunk, garbage stream
  _raises_one_line(path)


@pytest.mark.parametrize("content", [b"", b"garbage, not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 30])
def test_garbage_file_raises_naming_path(content, tmp_path):
  path = tmp_path / "junk.png"
  path.write_bytes(content)
  msg = _raises_one_line(path)
  assert ("empty file" in msg) == (content == b"")


def test_missing_file_and_folder(tmp_path):
  assert _raises_one_line(tmp_path / "nope.png").endswith("file not found")
  (tmp_path / "dir.png").mkdir()
  assert "cannot read file" in _raises_one_line(tmp_path / "dir.png")


def test_decode_png_names_record():
  with pytest.raises(images.ImageReadError, match=r"^shard-1: record 3: cannot decode image"):
    images.decode_png(b"\x89PNG\r\n\x1a\n" + b"\1" * 40, "shard-1: record 3")


def test_header_reads_need_no_decode(tmp_path):
  """Size and PNG text from the header (Pillow's lazy open), errors naming the file."""
  path = tmp_path / "a.png"
  images.save_png(path, np.zeros((5, 7, 3), np.uint8))
  assert images.header_hw(path) == (5, 7) and images.png_text(path) == {}
  (tmp_path / "junk.png").write_bytes(b"not an image")
  with pytest.raises(images.ImageReadError, match="junk.png: cannot read image"):
    images.header_hw(tmp_path / "junk.png")
  with pytest.raises(images.ImageReadError, match="missing.png: file not found"):
    images.header_hw(tmp_path / "missing.png")
  assert images.png_text(tmp_path / "junk.png") == {} and images.png_text(tmp_path / "missing.png") == {}
