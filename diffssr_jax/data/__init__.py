"""Data half of diffssr-jax: SPE export (torch/numpy only) and the grain training / evaluation inputs.

Modules (import them directly; this package imports nothing, and none of them imports jax):

  tfrecord                   TFRecord framing and random-access index without TensorFlow
  records                    the tile record schema (HR tile, LR tile, SPE tile) as tf.train.Example
  rle                        COCO run-length encoded masks (SAM amg.py format)
  segmenters                 Segment Anything and classical (Felzenszwalb, SLIC) segmenters
  torchvision_fallback       the torchvision functions segment-anything needs, when torchvision is absent
  hr_sources                 HR images from a folder or a prepared TFDS dataset
  export                     tiling, sharded resumable export (tools/export_sam_masks.py)
  export_files               the export's output folder: shard names, journals, staging, run settings, manifest
  source, pipeline           grain data source and training iterator
  eval_sources               benchmark folders (HR only, or HR + LR)
  demo                       demo dataset from scikit-image's bundled photographs
  imresize, spe              MATLAB-compatible bicubic resize; structural position encodings
  export_cli                 the mask export command (tools/export_sam_masks.py)
"""
