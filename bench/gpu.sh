#!/usr/bin/env bash
# The classification benchmark on a CUDA GPU, self-contained for a bare GPU host: needs python3 with torch and
# torchvision (pip install torch==2.14.1 torchvision==0.29.1 on a host with internet) and this checkout.
# Data travel with the checkout: Fashion-MNIST IDX files in data/ (or Debian's package), and CIFAR-10's
# cifar-10-batches-py/ in data/ if you have it (for the cifar10-fast recipe).
#
#   bash bench/gpu.sh            # prints tables, writes bench/results/gpu-*.json
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
"$PY" - <<'PYEOF'
import importlib, sys
missing = [m for m in ("torch", "torchvision", "yaml", "safetensors", "torchmetrics", "matplotlib", "tqdm")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"bench/gpu.sh: missing Python packages {missing}; pip install -e . (or those names) first")
import torch
if not torch.cuda.is_available():
    sys.exit("bench/gpu.sh: no CUDA device visible; this script is for a GPU host")
print("GPU:", torch.cuda.get_device_name(0), "torch", torch.__version__)
PYEOF
mkdir -p bench/results
# Throughput (compiled rows included) and the Fashion-MNIST recipe end to end on the GPU.
"$PY" bench/classification.py --device cuda --batch 128 --seeds 0 1 2 \
  --recipe-set train.device=cuda --recipe-set data.root=data --out bench/results/gpu-classification.json
# CIFAR-10 fast recipe (airbench's published A100 figure: 94% in 2.6-3.8 s), when the data came along.
if [ -f data/cifar-10-batches-py/data_batch_1 ]; then
  for seed in 0 1 2; do
    start=$(date +%s.%N)
    "$PY" -m modelworks train classification --recipe cifar10-fast --name "gpu-cifar10-fast-$seed" \
      --set train.seed=$seed --set data.root=data --set output_dir=bench/results/runs
    end=$(date +%s.%N)
    "$PY" - "$seed" "$start" "$end" <<'PYEOF'
import json, sys
seed, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
test = json.load(open(f"bench/results/runs/classification/gpu-cifar10-fast-{seed}/evaluation/test.json"))
print(f"| cifar10-fast seed {seed} | test acc {test['test/acc1']:.4f} | {end - start:.1f} s end to end |")
PYEOF
  done
else
  echo "cifar10-fast skipped: data/cifar-10-batches-py not present"
fi
