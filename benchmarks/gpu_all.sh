#!/usr/bin/env bash
# Every accelerator benchmark in one call (fits the 10-minute limit of a lent H100/H200):
#   bash benchmarks/gpu_all.sh [OUT_DIR [NAME ...]]
# Train steps of the pretraining configs (ALBEF, MAMO, ViCHA, VLMixer, MVP; ALBEF with full remat, MAMO with the remat
# policies 'full' and 'dots'; ALBEF and MAMO with their layers under nn.scan), the attention kernels, the accelerator half of device_augment,
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
# The train steps compile in parallel on the host's cores and take turns on the accelerator
# (--timing_lock); without preallocation the processes share its memory, and each frees its
# share when it exits after its turn.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
common="--batch=128 --text_len=30 --steps=20 --peak_tflops=989 --timing_lock=$out/timing.lock"
pick() { [ "$selected" = "  " ] || [[ "$selected" == *" $1 "* ]]; }
run() {  # name, command...
  local name=$1; shift
  pick "$name" || return 0
  echo "== $name: $*"
  "$@" > "$out/$name.log" 2>&1 || echo "   failed (rc $?), see $out/$name.log"
}
started=$(date +%s)
for spec in "albef configs/albef.py" "mamo configs/mamo.py" "vicha configs/vicha.py" "vlmixer configs/vlmixer.py" \
            "mvp configs/mvp.py" "albef_remat configs/albef.py --remat=full" \
            "mamo_full configs/mamo.py --remat=full" "mamo_dots configs/mamo.py --remat=dots" \
            "albef_scan configs/albef.py --scan_layers=true" "mamo_scan configs/mamo.py --scan_layers=true"; do
  set -- $spec
  name=$1; config=$2; shift 2
  run "$name" python3 benchmarks/train_step.py --config="$config" $common "$@" &
done
wait
echo "== train steps done in $(( $(date +%s) - started )) s"
run attention python3 benchmarks/attention.py
run device_augment python3 -m benchmarks.input_pipeline --device_only --device_batches=32,128
run retrieval python3 benchmarks/retrieval_eval.py
run retrieval_nocache python3 benchmarks/retrieval_eval.py --image_cache=false
run rerank_flops python3 benchmarks/rerank_cache.py
run cmc_op python3 benchmarks/cmc_op.py
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null
for name in albef mamo vicha vlmixer mvp albef_remat mamo_full mamo_dots albef_scan mamo_scan; do
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
