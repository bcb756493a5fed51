"""Entry point: `python -m diffssr_jax.main --config configs/X.py --workdir DIR [--config.key=value ...]`."""
import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and summary.json.")
config_flags.DEFINE_config_file("config", None, "Training configuration file (configs/*.py).", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Our progress at INFO; libraries (orbax logs every file it writes) at WARNING.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("diffssr_jax").setLevel(logging.INFO)
  from diffssr_jax import train  # after flag parsing: keeps --help fast
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
