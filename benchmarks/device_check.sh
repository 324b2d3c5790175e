#!/usr/bin/env bash
# The device path's checks on a machine with a GPU (`run --device cuda`), as one script for a
# session that is lent one (the workplace's device tool runs it over a copy of the tree; CI
# never has a GPU). It runs the tests of the device path on the GPU (MISALIGN_TEST_DEVICE=cuda:
# torch there against numpy, every number within 1e-12 of its scale), then the end-to-end
# benchmark at 10^6 and 10^7 plays of benchmarks/large.toml against the bare torch loop of the
# same maps on the same GPU. Logs go to $OUT (or ./device_check when unset).
#
# The GPU image has torch, numpy, scipy, matplotlib, pyarrow, typer, rich, jinja2, joblib and
# pytest, not pydantic or tomli-w: carry them as wheels. Once, here, in the repository's root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 tomli-w==1.2.0
# then call the device tool's run with command "bash benchmarks/device_check.sh",
# carry [".whl"] and timeout_s 600 (the parts stop at 120, 120 and 300 s).
set -o pipefail
out=${OUT:-device_check}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src:$PWD/benchmarks"
export PYTHONUNBUFFERED=1 MISALIGN_TEST_DEVICE=${MISALIGN_TEST_DEVICE:-cuda}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
  | tee -a "$out/gpu.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider \
  src/misalign/model src/misalign/runtime/device_test.py src/misalign/workflows/batch_test.py \
  -k "torch or device or gpu or host" 2>&1 | tee "$out/tests.log"
for run in 1000000:120 10000000:300; do
  timeout "${run#*:}" python3 benchmarks/run_bench.py --device "$MISALIGN_TEST_DEVICE" \
    --seeds "${run%:*}" --config benchmarks/large.toml 2>&1 | tee "$out/bench_${run%:*}.log"
done
