#!/usr/bin/env bash
# Prepares what tools/gpu_check.sh needs on the device machine (no internet there) in .gpu/ (git-ignored):
#   .gpu/whl/        wheels missing from the device image (ml-collections, rotary-embedding-torch for the official code)
#   .gpu/official/   the official SAM-DiffSR code folders (git archive of a fetched copy) + ../shared/official scripts
#   .gpu/reference.npz   the official reference outputs for the parity tests
# Usage (repo root, on this machine): tools/gpu_prepare.sh /work/.mirror/lose4578+SAM-DiffSR/repo
# (the argument is the git dir the session's `fetch github:lose4578/SAM-DiffSR` returned). Then, with the device
# tool: command "bash tools/gpu_check.sh", carry [".gpu"], timeout_s 560.
set -euo pipefail
official_git=${1:?usage: tools/gpu_prepare.sh <git dir of lose4578/SAM-DiffSR>}
shared=${SHARED:-$(cd "$(dirname "$0")/../.." && pwd)/shared}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/whl .gpu/official/code
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat \
  -d .gpu/whl ml-collections==1.1.0 rotary-embedding-torch==0.8.0
git -C "$official_git" archive HEAD configs models_sr tasks utils_sr data_gen tools | tar -x -C .gpu/official/code
git -C "$official_git" rev-parse HEAD > .gpu/official/code/COMMIT
cp "$shared"/official/*.py .gpu/official/
cp "$shared"/reference/reference.npz .gpu/reference.npz
du -sh .gpu
