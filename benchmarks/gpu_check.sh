#!/usr/bin/env bash
# The prepared GPU check (issue 6), run on a lent GPU machine in one go:
#   build a CUDA llama-cpp-python from the trimmed sdist in .gpu/llama-src.tar.gz, install it with
#   the wheels carried in .gpu/, then run benchmarks/gpu_check.py. Everything is logged to
#   $OUT/gpu_check.log. That machine reaches no registry: all it needs travels in .gpu/.
# Prepare .gpu/ here first (see the closing note of issue 6 in CHANGELOG.md for the commands).
set -uo pipefail
PY=${PYTHON:-python3}
LOG=${OUT:-/tmp}/gpu_check.log
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.free,driver_version --format=csv
echo "nvcc: $(nvcc --version | tail -1); cmake: $(cmake --version | head -1); cores: $(nproc)"
$PY -c "import sys, scikit_build_core; print('python', sys.version.split()[0], 'scikit-build-core', scikit_build_core.__version__)"

# cuBLAS: from the CUDA toolkit if it has it, else from the nvidia-cublas wheel of the image.
EXTRA=""
if ! ls /usr/local/cuda/lib64/libcublas.so* >/dev/null 2>&1 && ! ls /usr/local/cuda/targets/*/lib/libcublas.so* >/dev/null 2>&1; then
  CUBLAS_DIR=$($PY -c "import nvidia.cublas, os; print(os.path.dirname(nvidia.cublas.__file__))" 2>/dev/null \
    || $PY -c "import nvidia, os, glob; print(glob.glob(os.path.join(list(nvidia.__path__)[0], '*', 'lib', 'libcublas.so*'))[0].rsplit('/lib/', 1)[0])")
  echo "cuBLAS from the wheel at $CUBLAS_DIR"
  mkdir -p /tmp/cublas/lib
  for f in "$CUBLAS_DIR"/lib/libcublas*.so.*; do ln -sf "$f" "/tmp/cublas/lib/$(basename "$f" | sed 's/\.so\..*/.so/')"; done
  EXTRA="-DCMAKE_LIBRARY_PATH=/tmp/cublas/lib -DCMAKE_CUDA_FLAGS=-I$CUBLAS_DIR/include -DCMAKE_CXX_FLAGS=-I$CUBLAS_DIR/include"
  export LD_LIBRARY_PATH="$CUBLAS_DIR/lib:${LD_LIBRARY_PATH:-}"
fi

if [ -d /tmp/site/llama_cpp ]; then export PYTHONPATH=/tmp/site:$PWD; exec $PY benchmarks/gpu_check.py; fi
mkdir -p /tmp/build /tmp/wheel && tar xzf .gpu/llama-src.tar.gz -C /tmp/build || exit 1
FLAGS=$($PY -c "import sys; sys.path.insert(0, '.'); from nbllm.host.build_flags import cmake_args; print(' '.join(cmake_args(cuda=True)))")
export CMAKE_ARGS="$FLAGS -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAVA_BUILD=OFF $EXTRA"
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
echo "CMAKE_ARGS=$CMAKE_ARGS"
start=$(date +%s)
$PY -m pip wheel --no-build-isolation --no-deps -w /tmp/wheel /tmp/build/llama_cpp_python-0.3.36 > /tmp/build.log 2>&1
rc=$?
echo "build exit $rc after $(( $(date +%s) - start ))s"
if [ $rc -ne 0 ]; then tail -60 /tmp/build.log; cp /tmp/build.log "${OUT:-/tmp}/build.log"; exit 1; fi
$PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/wheel/*.whl .gpu/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
$PY benchmarks/gpu_check.py
