"""CRC-32C, tf.train.Example codec and TFRecord framing/reader (no TensorFlow)."""
import os
import struct

import numpy as np
import pytest

from diffssr_jax.data import crc32c as crc
from diffssr_jax.data import example, tfrecord


def _slow_crc(data):
  reg = 0xFFFFFFFF
  for b in data:
    reg ^= b
    for _ in range(8):
      reg = (reg >> 1) ^ (0x82F63B78 if reg & 1 else 0)
  return reg ^ 0xFFFFFFFF


def test_crc32c_known_vectors():
  assert crc.crc32c(b"123456789") == 0xE3069283
  assert crc.crc32c(b"") == 0
  assert crc.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
  assert crc.crc32c(b"\xff" * 32) == 0x62A8AB43


@pytest.mark.parametrize("n", [1, 4095, 4096, 4097, 70001, 300000])
def test_crc32c_lanes_equal_bitwise_definition(n):
  data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
  want = _slow_crc(data[:5000]) if n <= 5000 else None
  got = crc._crc32c_python(data)
  if want is not None:
    assert got == want
  assert got == crc._update_bytes(0xFFFFFFFF, data) ^ 0xFFFFFFFF
  k = n // 3
  assert crc._crc32c_python(data[k:], crc._crc32c_python(data[:k])) == got


def test_masked_crc():
  c = crc.crc32c(b"abc")
  assert crc.masked_crc32c(b"abc") == ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


FEATS = {
    "image/id": b"0001",
    "name": "héllo",
    "tile/y": 320,
    "neg": [-1, -(2**40), 2**62],
    "spe/shape": np.array([320, 160], np.int64),
    "f": [0.5, -2.25],
    "empty_f": np.zeros((0,), np.float32),
    "many": [b"a", b"", b"ccc"],
}


def test_example_round_trip():
  out = example.decode_example(example.encode_example(FEATS))
  assert out["image/id"] == [b"0001"]
  assert out["name"] == ["héllo".encode()]
  np.testing.assert_array_equal(out["tile/y"], [320])
  np.testing.assert_array_equal(out["neg"], [-1, -(2**40), 2**62])
  assert out["neg"].dtype == np.int64
  np.testing.assert_array_equal(out["spe/shape"], [320, 160])
  np.testing.assert_array_equal(out["f"], np.float32([0.5, -2.25]))
  assert out["f"].dtype == np.float32 and out["empty_f"].size == 0
  assert out["many"] == [b"a", b"", b"ccc"]


def test_example_matches_protobuf_definition():
  """Bytes equal protobuf's own deterministic serialisation of the same tf.train.Example."""
  try:
    from tensorflow_datasets.proto import tf_example_pb2 as pb
  except ImportError:
    pytest.skip("tensorflow_datasets protos unavailable")
  ex = pb.Example()
  f = ex.features.feature
  f["image/id"].bytes_list.value.append(b"0001")
  f["tile/y"].int64_list.value.append(320)
  f["neg"].int64_list.value.extend([-1, -(2**40), 2**62])
  f["f"].float_list.value.extend([0.5, -2.25])
  ours = example.encode_example({"image/id": b"0001", "tile/y": 320, "neg": [-1, -(2**40), 2**62],
                                 "f": [0.5, -2.25]})
  assert ours == ex.SerializeToString(deterministic=True)
  parsed = pb.Example.FromString(ours)
  assert list(parsed.features.feature["neg"].int64_list.value) == [-1, -(2**40), 2**62]


def test_example_decodes_unpacked_and_skips_unknown():
  # Int64List with two unpacked values 7, 300; FloatList unpacked 1.5; plus an unknown varint field 9.
  i64 = b"\x08\x07" + b"\x08\xac\x02"
  flt = b"\x0d" + struct.pack("<f", 1.5)
  def field(n, payload):
    return example._field(n, 2, payload)
  feat_i = field(3, i64)
  feat_f = field(2, flt)
  entry_i = field(1, b"a") + field(2, feat_i) + b"\x48\x01"
  entry_f = field(1, b"b") + field(2, feat_f)
  data = field(1, field(1, entry_i) + field(1, entry_f))
  out = example.decode_example(data)
  np.testing.assert_array_equal(out["a"], [7, 300])
  np.testing.assert_array_equal(out["b"], [1.5])


def test_example_rejects_garbage():
  with pytest.raises(example.ExampleDecodeError):
    example.decode_example(b"\x0a\x10\x0a")
  with pytest.raises(TypeError):
    example.encode_example({"x": []})


def _write(path, payloads):
  with tfrecord.TFRecordWriter(path) as w:
    return [w.write(p) for p in payloads]


def test_frame_layout(tmp_path):
  data = b"hello"
  rec = tfrecord.frame(data)
  assert rec[:8] == struct.pack("<Q", 5)
  assert struct.unpack("<I", rec[8:12])[0] == crc.masked_crc32c(rec[:8])
  assert rec[12:17] == data and struct.unpack("<I", rec[17:])[0] == crc.masked_crc32c(data)


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
