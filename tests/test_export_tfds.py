"""Export inputs from prepared tensorflow-datasets data, without TensorFlow (array_record and TFRecord)."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from diffssr_jax.data import export, hr_sources, tfrecord

tfds = pytest.importorskip("tensorflow_datasets")
from tensorflow_datasets.proto import tf_example_pb2  # noqa: E402


def _img(i):
  return np.random.default_rng(i).integers(0, 256, (72 + 4 * i, 80, 3)).astype(np.uint8)


def _png(arr):
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG")
  return buf.getvalue()


def _fake_tfrecord_dataset(root, n=3, payloads=None):
  """A TFDS dataset folder as tfds writes it with file_format=tfrecord and an Image feature 'hr' (PNGs of
  `_img(i)`, or the given encoded images; None: a record without the feature)."""
  payloads = [_png(_img(i)) for i in range(n)] if payloads is None else payloads
  n = len(payloads)
  d = root / "fakesr" / "1.0.0"
  d.mkdir(parents=True)
  (d / "dataset_info.json").write_text(json.dumps({
      "fileFormat": "tfrecord", "name": "fakesr", "version": "1.0.0",
      "splits": [{"name": "train", "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
                  "shardLengths": [str(n)], "numBytes": "0"}]}))
  (d / "features.json").write_text(json.dumps({
      "pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
      "featuresDict": {"features": {"hr": {
          "pythonClassName": "tensorflow_datasets.core.features.image_feature.Image",
          "image": {"shape": {"dimensions": ["-1", "-1", "3"]}, "dtype": "uint8", "encodingFormat": "png"}}}}}))
  with tfrecord.TFRecordWriter(d / "fakesr-train.tfrecord-00000-of-00001") as w:
    for data in payloads:
      ex = tf_example_pb2.Example()
      if data is not None:
        ex.features.feature["hr"].bytes_list.value.append(data)
      w.write(ex.SerializeToString())
  return root


def test_tfrecord_format_dataset(tmp_path):
  root = _fake_tfrecord_dataset(tmp_path / "tfds")
  src = hr_sources.open_source("fakesr", tfds_data_dir=root)
  assert src.describe()["file_format"] == "tfrecord" and src.key == "hr"
  assert src.ids == ["train-000000", "train-000001", "train-000002"]
  np.testing.assert_array_equal(src.load("train-000002"), _img(2))
  m = export.run_export(src, tmp_path / "out", export.ExportConfig(tile_size=64, tile_step=64, min_tile=32,
                                                                 num_shards=1),
                        segmenter=_Const(), progress=False)
  assert m["splits"]["train"]["num_records"] == 3 and m["splits"]["train"]["source"]["kind"] == "tfds"


def test_tfrecord_images_any_layout_and_errors(tmp_path):
  """TFRecord-format TFDS images decode like files: 16-bit colour rounded to 8 bits, grey replicated (each
  with a warning naming the record); a missing feature or undecodable bytes raise naming the record."""
  from diffssr_jax import images
  deep = np.random.default_rng(0).integers(0, 65536, (6, 5, 3)).astype(np.uint16)
  grey = _img(0)[:8, :8, 0]
  payloads = [images.encode_png(deep), _png(grey), None, b"not an image"]
  src = hr_sources.open_source("fakesr", tfds_data_dir=_fake_tfrecord_dataset(tmp_path / "tfds", payloads=payloads))
  with pytest.warns(UserWarning, match=r"tfds:fakesr/train-000000: 16-bit converted to 8-bit"):
    np.testing.assert_array_equal(src.load("train-000000"), images.to_uint8(deep))
  with pytest.warns(UserWarning, match=r"tfds:fakesr/train-000001: greyscale \(L\) replicated to RGB"):
    np.testing.assert_array_equal(src.load("train-000001"), np.repeat(grey[:, :, None], 3, axis=2))
  with pytest.raises(images.ImageReadError, match=r"^tfds:fakesr/train-000002: record has no image bytes"):
    src.load("train-000002")
  with pytest.raises(images.ImageReadError, match=r"^tfds:fakesr/train-000003: cannot decode image"):
    src.load("train-000003")


class _Const:
  def __call__(self, img):
    from diffssr_jax.data.segmenters import Segmentation
    return Segmentation(labels=np.zeros(img.shape[:2], np.int32))

  def describe(self):
    return {"name": "const"}


def test_array_record_dataset(tmp_path):
  pytest.importorskip("array_record")

  class TinySr(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="bytes")}))

    def _split_generators(self, dl_manager):
      return {"validation": self._generate_examples()}

    def _generate_examples(self):
      for i in range(2):
        yield i, {"image": _img(i)}

  try:
    TinySr(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
  except Exception as e:  # preparing needs no TF for Tensor features, but be robust to tfds changes
    pytest.skip(f"cannot prepare an array_record dataset here: {e}")
  src = hr_sources.TfdsSource("tiny_sr", data_dir=tmp_path / "tfds", split="validation")
  assert src.file_format == "array_record" and src.key == "image"
  np.testing.assert_array_equal(src.load("validation-000001"), _img(1))


def test_missing_dataset_and_bad_split(tmp_path):
  with pytest.raises(hr_sources.SourceError, match="not prepared"):
    hr_sources.TfdsSource("div2k", data_dir=tmp_path)
  root = _fake_tfrecord_dataset(tmp_path / "tfds")
  with pytest.raises(hr_sources.SourceError, match="no split 'test'"):
    hr_sources.TfdsSource("fakesr", data_dir=root, split="test")
  with pytest.raises(hr_sources.SourceError, match="not found"):
    hr_sources.TfdsSource("fakesr", data_dir=root, image_key="lr")
  with pytest.raises(hr_sources.SourceError, match="no such image folder"):
    hr_sources.open_source(str(tmp_path / "missing_dir"))
