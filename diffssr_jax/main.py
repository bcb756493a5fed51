"""Entry point: `python -m diffssr_jax.main --config NAME_OR_FILE --workdir DIR [--config.key=value ...]`.

--config is a packaged config's name (`demo`, `diffssr_df2k_x4`, ...: diffssr_jax/configs/NAME.py) or the path
of a config file of one's own.

Several processes (one per host, or one per GPU): run the same command in each, with --distributed
(JAX detects TPU pod slices, SLURM, Open MPI and Kubernetes by itself) or with --coordinator_address,
--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID);
train.batch_size is then the global batch over all processes' devices.

(`diffssr-train` once installed.) Library log messages (orbax, absl, jax) are hidden unless --verbosity 1
(-v); --verbosity 2 (-vv) shows debug output.
"""
import os
import sys

# numpy's OpenBLAS threads spin against XLA's for the same cores, slowing the input pipeline's small
# matrix products 10-100x on a busy CPU; one BLAS thread per process is what the data path needs.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from diffssr_jax import cli as shared_cli  # noqa: E402
from diffssr_jax import errors, logging_setup  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and summary.json.")
config_flags.DEFINE_config_file("config", None, "Training configuration: a config file, or the name of a packaged "
                                "one (demo, diffssr_df2k_x4, ...: diffssr_jax/configs/NAME.py).", lock_config=True)
flags.DEFINE_bool("allow_config_change", False, "Resume a workdir whose config.json differs in safe settings only "
                  "(steps, learning rate, intervals, data paths; see diffssr_jax/training/workdir.py). Model, "
                  "diffusion and data-layout settings can never change in a workdir.")
flags.DEFINE_bool("distributed", False, "Multi-process run: join the others through jax.distributed (implied by "
                  "--coordinator_address or JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordination service (default: "
                    "$JAX_COORDINATOR_ADDRESS, or detected on TPU pods / SLURM / Open MPI / Kubernetes).")
flags.DEFINE_integer("num_processes", None, "Number of processes (default: $JAX_NUM_PROCESSES or detected).")
flags.DEFINE_integer("process_id", None, "This process' index, 0 .. num_processes-1 (default: $JAX_PROCESS_ID or "
                     "detected).")
flags.DEFINE_integer("heartbeat_timeout", 60, "Seconds after which the other processes stop with an error when "
                     "one has died (missed heartbeats).")
shared_cli.mark_required(["config", "workdir"])


def check_locations(config, workdir) -> None:
  """Refuses, in one line naming it, a workdir, data or eval location, or RRDB checkpoint that no storage
  backend can serve (unknown scheme, bucket without credentials or emulator)."""
  from diffssr_jax import storage
  c = config
  try:
    storage.check_all({"--workdir": workdir, "data.train_files": c.data.get("train_files"),
                       "data.demo_dir": c.data.get("demo_dir"), "eval.hr_dir": c.eval.get("hr_dir"),
                       "eval.lr_dir": c.eval.get("lr_dir"), "train.rrdb_checkpoint": c.train.get("rrdb_checkpoint"),
                       "compilation_cache": c.get("compilation_cache"),
                       "distill.teacher_workdir": (c.get("distill") or {}).get("teacher_workdir")})
  except storage.StorageError as e:
    raise SystemExit(f"error: {e}") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Our progress at INFO; libraries (orbax logs every file it writes) quiet unless --verbosity is given (absl's
  # own flag, whose unset default absl turns into 0 after parsing; logging_setup gives 0 our meaning).
  logging_setup.setup_logging(FLAGS.verbosity if FLAGS["verbosity"].present else 0)
  config = FLAGS.config
  try:
    config.keys()  # a config file that failed to load gives a stand-in that raises on first use
  except OSError as e:
    # A config file that cannot be loaded: the line naming the file and the cause, not two tracebacks.
    lines = [" ".join(l.split()) for l in str(e).splitlines() if l.strip()]
    from diffssr_jax import configs
    raise SystemExit("error: --config: " + next((l for l in lines if "Errno" in l), " ".join(lines))
                     + f" (a file path, or a packaged config: {', '.join(configs.names())})") from None
  check_locations(FLAGS.config, FLAGS.workdir)  # before joining other processes or writing anything
  if FLAGS.distributed or FLAGS.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    from diffssr_jax import parallel
    parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                        heartbeat_timeout=FLAGS.heartbeat_timeout)
  from diffssr_jax import preemption
  from diffssr_jax.training import config_check, distill, integrity, lock, train, workdir  # after flag parsing
  refusals = (workdir.ConfigMismatchError, integrity.CheckpointMismatchError,
              integrity.UnverifiedCheckpointError, config_check.ConfigError, lock.WorkdirLockedError,
              distill.TeacherError)
  try:
    train.train_and_evaluate(config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change)
  except refusals as e:  # the workdir is protected, nothing crashed: the message without a traceback
    raise SystemExit(f"error: {e}") from None
  except preemption.Preempted as e:  # saved; non-zero so that a scheduler runs the job again
    shared_cli.error(str(e))
    raise SystemExit(preemption.EXIT_PREEMPTED) from None
  except Exception as e:  # noqa: BLE001 - a full disk or another OS error: one line naming path and cause
    message = errors.os_error_message(e)
    if message is None or FLAGS.verbosity >= 2:
      raise
    raise SystemExit(f"error: {message}") from None


def cli(argv=None) -> None:
  """diffssr-train (pyproject's console script; argv[0] the program, default sys.argv): `absl.app.run(main)`
  with dashed flag aliases and a --help that lists the defaults. Exits."""
  from diffssr_jax import configs  # --config NAME: the packaged config of that name
  shared_cli.run_absl(main, configs.resolve_argv(sys.argv if argv is None else argv), __doc__)


if __name__ == "__main__":
  cli()
