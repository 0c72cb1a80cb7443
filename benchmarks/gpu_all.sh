#!/usr/bin/env bash
# Every accelerator benchmark in one call (fits the 10-minute limit of a lent H100/H200):
#   bash benchmarks/gpu_all.sh [OUT_DIR [NAME ...]]
# Train steps of the pretraining configs (ALBEF, MAMO, ViCHA, VLMixer, MVP; ALBEF with full remat, MAMO with the remat
# policies 'full' and 'dots'), the attention kernels, the accelerator half of device_augment,
# the host cost of VLMixer's CMC batch op, the Flickr-size retrieval eval with and without the rerank's image key/value cache, and the
# rerank's FLOPs before/after the cache. NAMEs pick runs (default: all), e.g.
#   bash benchmarks/gpu_all.sh /tmp/b mamo mamo_full mamo_dots retrieval retrieval_nocache
# Each log goes to OUT_DIR; the tables are printed last. Packages missing on the machine
# (ml_collections, clu) can travel as wheels in .whl/ (see docs/benchmarks.md).
set -u
out=${1:-/tmp/vlpjax_bench}
shift || true
selected=" $* "
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1
common="--batch=128 --text_len=30 --steps=20 --peak_tflops=989"
run() {  # name, command...
  local name=$1; shift
  if [ "$selected" != "  " ] && [[ "$selected" != *" $name "* ]]; then return; fi
  echo "== $name: $*"
  "$@" > "$out/$name.log" 2>&1 || echo "   failed (rc $?), see $out/$name.log"
}
run albef python3 benchmarks/train_step.py --config=configs/albef.py $common
run mamo python3 benchmarks/train_step.py --config=configs/mamo.py $common
run vicha python3 benchmarks/train_step.py --config=configs/vicha.py $common
run vlmixer python3 benchmarks/train_step.py --config=configs/vlmixer.py $common
run mvp python3 benchmarks/train_step.py --config=configs/mvp.py $common
run albef_remat python3 benchmarks/train_step.py --config=configs/albef.py $common --remat=full
run mamo_full python3 benchmarks/train_step.py --config=configs/mamo.py $common --remat=full
run mamo_dots python3 benchmarks/train_step.py --config=configs/mamo.py $common --remat=dots
run attention python3 benchmarks/attention.py
run device_augment python3 -m benchmarks.input_pipeline --device_only --device_batches=32,128
run retrieval python3 benchmarks/retrieval_eval.py
run retrieval_nocache python3 benchmarks/retrieval_eval.py --image_cache=false
run rerank_flops python3 benchmarks/rerank_cache.py
run cmc_op python3 benchmarks/cmc_op.py
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null
for name in albef mamo vicha vlmixer mvp albef_remat mamo_full mamo_dots; do
  [ -f "$out/$name.log" ] && grep "^| configs/" "$out/$name.log"
done
[ -f "$out/attention.log" ] && grep -A20 "^| shape" "$out/attention.log"
[ -f "$out/device_augment.log" ] && grep -A4 "^| batch" "$out/device_augment.log"
for name in retrieval retrieval_nocache; do
  [ -f "$out/$name.log" ] && tail -12 "$out/$name.log"
done
[ -f "$out/rerank_flops.log" ] && tail -8 "$out/rerank_flops.log"
[ -f "$out/cmc_op.log" ] && tail -4 "$out/cmc_op.log"
exit 0
