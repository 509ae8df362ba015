#!/usr/bin/env bash
# The oldest supported stack, torch 2.11.0 + triton 3.6.0 (the GPU machine's), on Python 3.12
# (none found fails the step): a second venv (~/.cache/fastvae/venv-oldest), fastvae built there with its
# CUDA kernels (torch 2.11.0's PyPI wheel is built for CUDA 13.0, like the toolkit here, so nvcc
# compiles against its headers), the whole suite, the Triton cubin compile and the static GPU checks
# included, and a rehearsal of `make gpu-check`. It builds and tests in a copy of the tree, so the
# default .venv's in-place fastvae/_C stays built against the default torch.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Outside the tree, so that CI's fresh clones on one machine share it: creating it unpacks about
# 5 GB. The pip install below makes it the pinned stack whatever state it was left in.
venv="${OLDEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fastvae/venv-oldest}"
torch_pin="torch==2.11.0"
triton_pin="triton==3.6.0"

find_python() {
  # Python 3.12, as on the GPU machine; pyenv keeps it out of PATH unless selected.
  for candidate in "${PYTHON_OLDEST:-}" python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do
    if [[ -n "$candidate" ]] && "$candidate" -V >/dev/null 2>&1; then echo "$candidate"; return; fi
  done
  # Another Python would pass this step without testing what the GPU machine runs.
  echo "oldest_stack: no Python 3.12 found (set PYTHON_OLDEST to one)" >&2
  return 1
}

if [[ ! -x "$venv/bin/python" ]]; then
  python_oldest="$(find_python)"
  "$python_oldest" -m venv "$venv"
fi
py="$venv/bin/python"
# triton 3.6's interpreter (the suite's CPU path) calls int() on 1-element arrays, which numpy
# 2.4 made an error ("only 0-dimensional arrays can be converted to Python scalars"; triton 3.8
# no longer does it); GPUs do not use the interpreter, so this pin is for the CPU run only.
"$py" -m pip install -q "$torch_pin" "$triton_pin" "numpy<2.4" "setuptools>=70.1" wheel ninja \
  pillow tqdm safetensors pytest pytest-benchmark scipy matplotlib
"$py" -c "import sys, torch, triton; print('oldest_stack: python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"

copy="$(mktemp -d "${TMPDIR:-/tmp}/fastvae-oldest.XXXXXX")"
trap 'rm -rf "$copy"' EXIT
(cd "$root" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$copy")
cd "$copy"
# One arch is enough to show the CUDA code compiles against this torch; the default build in
# `make test` covers the arch list.
FASTVAE_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0+PTX}" \
  "$py" -m pip install -q --no-deps --no-build-isolation -e .
"$py" -m pytest -q -p no:cacheprovider -rfEsx
# A GPU session runs `make gpu-check` on this stack, in minutes it cannot get back: rehearse it
# here, so that a step that cannot start on torch 2.11 / triton 3.6 / Python 3.12 (an import, a
# test that fails to collect) shows before a GPU is spent on it.
make gpu-check DRY_RUN=1 GPU_PYTHON="$py" OUT="$copy/gpu-check-out"
