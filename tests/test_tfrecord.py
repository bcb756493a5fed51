"""TFRecord framing/index/reader (CRC-32C from google-crc32c) and the tile record as tf.train.Example."""
import os
import struct

import numpy as np
import pytest
from tensorflow_datasets.proto import tf_example_pb2

from diffssr_jax import images
from diffssr_jax.data import records, tfrecord


def test_masked_crc_known_values():
  c = 0xE3069283  # CRC-32C check value of b"123456789" (RFC 3720)
  assert tfrecord.masked_crc32c(b"123456789") == ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF
  # Frames and a long-input CRC as the previous (numpy, RFC-vector-tested) implementation wrote them; the
  # empty record is the one tf.io.TFRecordWriter writes for b"".
  assert tfrecord.frame(b"").hex() == "000000000000000029039807d8ea82a2"
  assert tfrecord.frame(b"123456789").hex() == "090000000000000037f97139313233343536373839e5b08ac7"
  assert tfrecord.masked_crc32c(bytes(range(256)) * 40) == 0x7C3265E0


# ---------------------------------------------------------------- the tile record
# A tile record serialised by the project's previous hand-written Example encoder (PNGs by Pillow): HR
# (4, 4, 3) = 5 * arange, LR [[[200, 100, 50]]], SPE arange(16) / 8 - 1, id "img/0001", y 4, x 0,
# 3 segments, HR size (8, 12).
OLD_TILE = bytes.fromhex(
    "0a96030a640a0c696d6167652f68725f706e6712540a520a5089504e470d0a1a0a0000000d4948445200000004000000"
    "0408020000002693092900000017494441547801636460e5e28701161b1b1b189b1f3707006ad204554e1be0fa000000"
    "0049454e44ae4260820a170a0d696d6167652f68725f73697a6512061a040a02080c0a180a08696d6167652f6964120c"
    "0a0a0a08696d672f303030310a590a0c696d6167652f6c725f706e6712490a470a4589504e470d0a1a0a0000000d4948"
    "445200000001000000010802000000907753de0000000c4944415478016338916204000356015ffa9438010000000049"
    "454e44ae4260820a170a0e7365676d656e74732f636f756e7412051a030a01030a500a087370652f6461746112440a42"
    "0a40000080bf000060bf000040bf000020bf000000bf0000c0be000080be000000be000000000000003e0000803e0000"
    "c03e0000003f0000203f0000403f0000603f0a130a097370652f736861706512061a040a0204040a0f0a0674696c652f"
    "7812051a030a01000a0f0a0674696c652f7912051a030a0104")


def _old_tile():
  hr = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) * 5
  spe = np.arange(16, dtype=np.float32).reshape(4, 4) / 8 - 1
  return records.Tile("img/0001", 4, 0, hr, np.array([[[200, 100, 50]]], np.uint8), spe, 3, (8, 12))


def _assert_tiles_equal(a, b):
  assert (a.image_id, a.y, a.x, a.segments, a.hr_size) == (b.image_id, b.y, b.x, b.segments, b.hr_size)
  for k in ("hr", "lr", "spe"):
    np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
  assert a.hr.dtype == np.uint8 and a.lr.dtype == np.uint8 and a.spe.dtype == np.float32


def test_records_written_by_the_old_encoder_decode():
  _assert_tiles_equal(records.decode_tile(OLD_TILE, scale=4), _old_tile())


def test_encoder_matches_the_old_bytes_except_png_payloads():
  """Same features, kinds, values and order as before: with the old PNG payloads put in, the new
  serialisation is the old record byte for byte (only the PNG codec changed)."""
  new = records.encode_tile(_old_tile())
  assert new == records.encode_tile(_old_tile())  # deterministic
  _assert_tiles_equal(records.decode_tile(new, scale=4), _old_tile())
  old_msg, new_msg = tf_example_pb2.Example.FromString(OLD_TILE), tf_example_pb2.Example.FromString(new)
  for key in ("image/hr_png", "image/lr_png"):
    new_msg.features.feature[key].CopyFrom(old_msg.features.feature[key])
  assert new_msg.SerializeToString(deterministic=True) == OLD_TILE


def test_tile_without_optional_features():
  t = _old_tile()
  t.hr_size, t.segments = None, 0
  ex = tf_example_pb2.Example.FromString(records.encode_tile(t))
  assert "image/hr_size" not in ex.features.feature
  del ex.features.feature["segments/count"]
  got = records.decode_tile(ex.SerializeToString())
  assert got.hr_size is None and got.segments == 0


def _edited(edit):
  ex = tf_example_pb2.Example.FromString(OLD_TILE)
  edit(ex.features.feature)
  return ex.SerializeToString()


@pytest.mark.parametrize("data,message", [
    (b"\x0a\x10\x0a", "malformed Example"),
    (OLD_TILE[:-5], "malformed Example"),
    (_edited(lambda f: f.pop("image/id")), "feature 'image/id' missing"),
    (_edited(lambda f: f["tile/y"].CopyFrom(f["image/id"])), "'tile/y' holds bytes_list, expected int64_list"),
    (_edited(lambda f: f["tile/x"].int64_list.value.append(1)), "'tile/x' has 2 values, expected one"),
    (_edited(lambda f: f["spe/shape"].int64_list.value.append(1)), "'spe/shape' is not \\[h, w\\]"),
    (_edited(lambda f: f["spe/data"].bytes_list.value.__setitem__(0, b"1234")), "spe/data has 4 bytes"),
    (_edited(lambda f: f["image/lr_png"].bytes_list.value.__setitem__(0, b"png?")), "cannot decode image"),
])
def test_bad_records_name_the_record(data, message):
  errors = (records.TileDecodeError, images.ImageReadError)
  with pytest.raises(errors, match=rf"^shard-0: record 7: .*{message}"):
    records.decode_tile(data, where="shard-0: record 7")


def test_scale_mismatch():
  with pytest.raises(records.TileDecodeError, match=r"LR tile \(1, 1\) x2 does not give HR \(4, 4\)"):
    records.decode_tile(OLD_TILE, scale=2)


def _write(path, payloads):
  with tfrecord.TFRecordWriter(path) as w:
    return [w.write(p) for p in payloads]


def test_frame_layout(tmp_path):
  data = b"hello"
  rec = tfrecord.frame(data)
  assert rec[:8] == struct.pack("<Q", 5)
  assert struct.unpack("<I", rec[8:12])[0] == tfrecord.masked_crc32c(rec[:8])
  assert rec[12:17] == data and struct.unpack("<I", rec[17:])[0] == tfrecord.masked_crc32c(data)


def test_write_index_read(tmp_path):
  payloads = [os.urandom(n) for n in (0, 10, 5000, 70000)]
  p = tmp_path / "a.tfrecord"
  offs = _write(p, payloads)
  o, n = tfrecord.build_index(p)
  np.testing.assert_array_equal(o, offs)
  np.testing.assert_array_equal(n, [len(x) for x in payloads])
  assert list(tfrecord.iter_records(p)) == payloads
  q = tmp_path / "b.tfrecord"
  _write(q, [b"x", b"yy"])
  idx = tfrecord.RecordIndex([p, q])
  assert len(idx) == 6
  assert [idx.read(i) for i in range(6)] == payloads + [b"x", b"yy"]
  assert idx.read(-1) == b"yy"
  import pickle
  idx2 = pickle.loads(pickle.dumps(idx))
  assert idx2.read(5) == b"yy"


def test_corrupt_data_names_file_and_offset(tmp_path):
  p = tmp_path / "c.tfrecord"
  offs = _write(p, [b"a" * 100, b"b" * 100, b"c" * 100])
  raw = bytearray(p.read_bytes())
  raw[offs[1] + 12 + 50] ^= 0x01  # flip one bit inside record 1's data
  p.write_bytes(bytes(raw))
  idx = tfrecord.RecordIndex([p])  # headers are fine
  assert idx.read(0) == b"a" * 100
  with pytest.raises(tfrecord.RecordError, match=rf"c\.tfrecord: record 1 at offset {offs[1]}: data CRC"):
    idx.read(1)
  with pytest.raises(tfrecord.RecordError, match=f"offset {offs[1]}"):
    list(tfrecord.iter_records(p))


def test_corrupt_header_and_truncation(tmp_path):
  p = tmp_path / "d.tfrecord"
  offs = _write(p, [b"a" * 100, b"b" * 100])
  raw = p.read_bytes()
  p.write_bytes(raw[:-7])
  with pytest.raises(tfrecord.RecordError, match=rf"d\.tfrecord: record 1 at offset {offs[1]}: truncated"):
    tfrecord.build_index(p)
  bad = bytearray(raw)
  bad[offs[1] + 2] ^= 0x40  # length field
  p.write_bytes(bytes(bad))
  with pytest.raises(tfrecord.RecordError, match=f"record 1 at offset {offs[1]}: length CRC"):
    tfrecord.build_index(p)


def test_expand_files(tmp_path):
  for name in ("train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord", "manifest.json"):
    (tmp_path / name).write_bytes(b"")
  assert [f.name for f in tfrecord.expand_files(tmp_path)] == ["train-00000-of-00002.tfrecord",
                                                               "train-00001-of-00002.tfrecord"]
  assert len(tfrecord.expand_files(str(tmp_path / "train-*"))) == 2
  with pytest.raises(FileNotFoundError):
    tfrecord.expand_files(str(tmp_path / "nope-*"))
