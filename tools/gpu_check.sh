#!/usr/bin/env bash
# The GPU check of issue 11, as one prepared command for the device tool (one H200): our benchmarks and the
# official PyTorch code's on the same work in the same call (so the ratios come from one run), and the
# `reference` parity tests on the GPU. Each part has its own timeout; results go to $OUT as JSON lines / logs.
#   prepare here:  tools/gpu_prepare.sh <fetched official git dir>
#   run:           device tool, command "bash tools/gpu_check.sh", carry [".gpu"], timeout_s 560
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
export DIFFSSR_REFERENCE=$PWD/.gpu/reference.npz
cache=/tmp/xla_cache   # fresh machine: every compile below is cold (first time) and stored
log() { echo "== $*" | tee -a "$OUT/log.txt"; }
bench() { local t=$1; shift; log "benchmark $*"; timeout "$t" python3 -m diffssr_jax.benchmarks.model "$@" \
  --compilation_cache "$cache" 2>>"$OUT/log.txt" | tee -a "$OUT/ours.jsonl"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c \
  "import jax, flax, optax, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__)"; } \
  >>"$OUT/log.txt" 2>&1
bench 150 train --batch_size 64 --patch_size 160 --repeats 10                    # bfloat16 (model.dtype auto)
bench 100 train --batch_size 16 --patch_size 160 --repeats 10                    # the official harness's batch
bench 120 sample --size 1356x2040 --sampler ddpm --repeats 5 --runs 3              # a DIV2K validation image
bench 90 sample --size 1356x2040 --sampler ddim --steps 25 --eta 1 --repeats 5 --runs 3
bench 60 sample --size 256 --sampler ddpm --repeats 5 --runs 3
log "official harness"
(cd .gpu/official && SAMDIFFSR_EXPORT=$PWD/code timeout 150 python3 bench_official_gpu.py --train-batch 16,64 \
  --sizes 256,1664 2>>"$OUT/log.txt" | tee "$OUT/official.jsonl")
log "reference parity tests on the GPU"
JAX_PLATFORMS=cuda timeout 150 python3 -m pytest -q -m reference -p no:cacheprovider tests/test_models.py tests/test_sampling.py \
  tests/test_train_step.py tests/test_diffusion_math.py tests/test_configs.py 2>&1 | tail -15 | tee "$OUT/parity.txt"
log "done"
