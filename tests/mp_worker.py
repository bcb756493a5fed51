"""One process of a multi-process training run for tests/test_multiprocess.py (a test helper, not a test).

Does what `python -m diffssr_jax.main` does (join the others with `parallel.initialize`, then
`train.train_and_evaluate`), and then saves the params this process holds at the end, so the test can
compare the processes with each other. With --crash_at N this process dies (SIGKILL) when step N starts,
as a preempted or failed host would; with --sigterm_at N it sends itself SIGTERM when step N starts (a
preemption notice to this host only) and, like `diffssr_jax.main`, exits 143 once the run has stopped.

  python tests/mp_worker.py --workdir W --devices 2 --num_processes 2 --process_id 0 --port 12345 \
      --out params_0.npz [--config.key=value ...]
"""
import argparse
import os
import signal
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--workdir", required=True)
parser.add_argument("--devices", type=int, required=True)
parser.add_argument("--num_processes", type=int, default=1)
parser.add_argument("--process_id", type=int, default=0)
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--out", required=True)
parser.add_argument("--crash_at", type=int, default=0)
parser.add_argument("--sigterm_at", type=int, default=0)
parser.add_argument("--heartbeat_timeout", type=int, default=10)
args, overrides = parser.parse_known_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
os.environ["JAX_PLATFORMS"] = "cpu"

import flax  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from diffssr_jax import logging_setup, parallel  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if args.num_processes > 1:
  parallel.initialize(f"localhost:{args.port}", args.num_processes, args.process_id,
                      heartbeat_timeout=args.heartbeat_timeout)
logging_setup.setup_logging(0)

from diffssr_jax.training import train, train_step  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "tests", "configs"))
import tiny_train  # noqa: E402

config = tiny_train.get_config()
for item in overrides:  # --config.a.b=value, as ml_collections' config flags take them
  key, value = item.removeprefix("--config.").split("=", 1)
  node = config
  *path, leaf = key.split(".")
  for part in path:
    node = node[part]
  node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], bool) else value == "True"

if args.crash_at or args.sigterm_at:
  make_step = train_step.make_step
  at, sig = (args.crash_at, signal.SIGKILL) if args.crash_at else (args.sigterm_at, signal.SIGTERM)

  def crashing_make_step(*a, **kw):
    step = make_step(*a, **kw)

    def run(state, batch):
      if int(jax.device_get(state.step)) + 1 == at:
        os.kill(os.getpid(), sig)
      return step(state, batch)
    return run
  train_step.make_step = crashing_make_step

from diffssr_jax import preemption  # noqa: E402

try:
  state = train.train_and_evaluate(config, args.workdir)
except preemption.Preempted as e:
  print(f"error: {e}", flush=True)
  sys.exit(preemption.EXIT_PREEMPTED)
params = flax.traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
np.savez(args.out, step=int(jax.device_get(state.step)), **params)
