"""Export inputs from prepared tensorflow-datasets data, without TensorFlow (array_record and TFRecord)."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from diffssr_jax.data import example, export, hr_sources, tfrecord

tfds = pytest.importorskip("tensorflow_datasets")


def _img(i):
  return np.random.default_rng(i).integers(0, 256, (72 + 4 * i, 80, 3)).astype(np.uint8)


def _fake_tfrecord_dataset(root, n=3):
  """A TFDS dataset folder as tfds writes it with file_format=tfrecord and an Image feature 'hr'."""
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
    for i in range(n):
      buf = io.BytesIO()
      Image.fromarray(_img(i)).save(buf, format="PNG")
      w.write(example.encode_example({"hr": buf.getvalue()}))
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
