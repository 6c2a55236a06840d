#!/usr/bin/env bash
# Run the benchmarks on a CUDA machine whose Python already has torch,
# transformers and peft (e.g. the lent H200), installing laplace-torch and its
# pure-Python dependencies from wheels in .whl/, and the package from this tree.
# Results go to ${OUT:-benchmarks/results} with the suffix _gpu. Fetch the wheels
# once (pure Python) with:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       laplace-torch==0.3 curvlinops-for-pytorch==3.0.1 asdfghjkl==0.1a4 \
#       backpack-for-pytorch==1.7.1 unfoldNd einconv
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import torch, transformers, peft, laplace; print(torch.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name())"
OUTDIR=${OUT:-benchmarks/results}
python3 benchmarks/bench_fit.py --device cuda --suffix _gpu --output "$OUTDIR"
python3 benchmarks/bench_lowrank.py --device cuda --suffix _gpu --output "$OUTDIR" \
    --dense-max 16384
python3 benchmarks/bench_predict.py --device cuda --suffix _gpu --output "$OUTDIR" \
    --sections ${PREDICT_SECTIONS:-tiny many}
