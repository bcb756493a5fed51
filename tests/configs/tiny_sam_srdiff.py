"""The tiny training config (tests/configs/tiny_train.py) as Table 7's SAM+SRDiff: SPE into the U-Net's
condition (`model.cond_sam`), no noise modulation. Seconds per run on CPU."""
import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("tiny_train", pathlib.Path(__file__).with_name("tiny_train.py"))
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)


def get_config():
  c = _tiny.get_config()
  c.model.cond_sam = True
  c.diffusion.modulation = "none"
  return c
