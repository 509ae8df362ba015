#!/usr/bin/env bash
# Configures, builds and runs the C++ unit tests (CMakeLists.txt) in a throwaway build folder:
# the CPU operator library from csrc/ and ctest's tests of the shared math and of the ops, then
# runs bench_vae_loss_loops once.
# Uses .venv's python when there is one, else PYTHON or python from PATH.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" && -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; fi
python="${PYTHON:-python}"
build="$(mktemp -d "${TMPDIR:-/tmp}/fastvae-cmake.XXXXXX")"
trap 'rm -rf "$build"' EXIT

cmake_args=(-S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release
  -DCMAKE_PREFIX_PATH="$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')")
# A CUDA build of torch makes find_package(Torch) look for the toolkit (and, without an arch
# list, for GPUs) even though these targets are CPU-only: point it at the toolkit setup.py finds.
if [[ "$("$python" -c 'import torch; print(torch.version.cuda is not None)')" == "True" ]]; then
  cuda_home="$(cd "$root" && "$python" -c 'import setup; print(setup.find_cuda_home() or "")')"
  if [[ -z "$cuda_home" ]]; then
    echo "build_checks: torch is a CUDA build but no CUDA toolkit was found; set CUDA_HOME" >&2
    exit 1
  fi
  cmake_args+=(-DCUDA_TOOLKIT_ROOT_DIR="$cuda_home")
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
fi

echo "build_checks: configuring and building in $build"
cmake "${cmake_args[@]}" > "$build/configure.log" 2>&1 || { cat "$build/configure.log"; exit 1; }
cmake --build "$build" -j2 > "$build/build.log" 2>&1 || { cat "$build/build.log"; exit 1; }
ctest --test-dir "$build" --output-on-failure
# The loop benchmark is built with the tests; one run keeps it working (its timings are not checked).
"$build/bench_vae_loss_loops"
