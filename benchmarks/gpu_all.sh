#!/usr/bin/env bash
# Every accelerator benchmark in one call (fits the 10-minute limit of a lent H100/H200):
#   bash benchmarks/gpu_all.sh [OUT_DIR]
# Train steps of the pretraining configs (ALBEF, MAMO, MVP; ALBEF with remat), the attention kernels,
# the accelerator half of device_augment and the Flickr-size retrieval eval. Each log goes to
# OUT_DIR; the tables are printed last. Packages missing on the machine (ml_collections, clu)
# can travel as wheels in .whl/ (see docs/benchmarks.md).
set -u
out=${1:-/tmp/vlpjax_bench}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1
common="--batch=128 --text_len=30 --steps=20 --peak_tflops=989"
run() {  # name, command...
  local name=$1; shift
  echo "== $name: $*"
  "$@" > "$out/$name.log" 2>&1 || echo "   failed (rc $?), see $out/$name.log"
}
run albef python3 benchmarks/train_step.py --config=configs/albef.py $common
run mamo python3 benchmarks/train_step.py --config=configs/mamo.py $common
run mvp python3 benchmarks/train_step.py --config=configs/mvp.py $common
run albef_remat python3 benchmarks/train_step.py --config=configs/albef.py $common --remat
run attention python3 benchmarks/attention.py
run device_augment python3 -m benchmarks.input_pipeline --device_only --device_batches=32,128
run retrieval python3 benchmarks/retrieval_eval.py
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null
for name in albef mamo mvp albef_remat; do grep "^| configs/" "$out/$name.log"; done
grep -A20 "^| shape" "$out/attention.log"
grep -A4 "^| batch" "$out/device_augment.log"
tail -12 "$out/retrieval.log"
