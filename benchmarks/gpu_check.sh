#!/usr/bin/env bash
# Every GPU path of the toolkit in one short prepared run on a lent H100/H200 (issue #22):
#   1. the MCL terms' share of one R18 MoCo step (b32, K 65536, M 2)      bench_mcl_losses.py
#   2. cohort of 2 vs one network: step time and peak memory (R18 b32, R50 b64)  bench_cohort_step.py
#   3. R50x2 bf16 + channels_last, b128: images/s on synthetic input      gpu_pretrain.py
#   4. the same fed by the input pipeline from JPEGs on disk vs synthetic bench_data.py --device cuda
#   5. pretraining under torchrun (1 process, NCCL), --amp bf16, a checkpoint, then --resume
#   6. tools/train_net.py with AMP on the toy VOC and toy COCO configs
#   7. the R50 member of step 5 converted, in the VOC R50-C4 config at full size, batch 2 (s/iter)
# A failing step is logged and the others still run; every figure lands in one JSON.
#
#   OUT=DIR bash benchmarks/gpu_check.sh              # on the GPU machine (python3 with torch)
#   GPU_CHECK_TINY=1 OUT=DIR bash benchmarks/gpu_check.sh   # the same code at smoke size on a CPU
#   GPU_CHECK_STEPS="voc_r50c4 voc_r50c4_amp" ...       # rerun only these steps (names below)
#
# Writes OUT/gpu_check.log (everything printed) and OUT/gpu_check.json (benchmarks/
# gpu_check_summary.py: the figures, their targets, each step's exit code and time); the
# intermediate files stay in WORK (default: a temporary folder). Needs mcl_det importable
# (PYTHONPATH=. in a checkout) and detectron2 (tools/install_detectron2.py --wheel DIR builds a
# wheel for a machine without the package registry).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
WORK=${WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
PY=${PY:-python3}
TINY=${GPU_CHECK_TINY:-0}
ONLY=" ${GPU_CHECK_STEPS:-} "
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 MCL_DET_DEBUG=1  # a failing step shows its traceback in the log
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

DATA=$WORK/data
PRE=$WORK/pretrain_r50x2
export DETECTRON2_DATASETS=$DATA
if [ "$TINY" = 1 ]; then
  DEV=cpu AMP=False ARCH=resnet50
  LOSSES=(--compile --device cpu --threads 1 --queue 512 --image-size 64 --rounds 1 --loss-reps 1)
  R18=(--device cpu --threads 1 --arch resnet18 --batch 4 --size 64 --queue 256 --iters 1 --warmup 1)
  R50=(--device cpu --threads 1 --arch resnet50 --batch 2 --size 64 --queue 256 --iters 1 --warmup 1)
  THROUGHPUT=(--device cpu --arch resnet18 --batch 4 --size 32 --queue 64 --iters 2 --warmup 1)
  FEED=(--device cpu --tiny)
  DET_ITERS=2 VOC_ITERS=2
  VOC_SMALL=(INPUT.MIN_SIZE_TRAIN "(160,)" INPUT.MAX_SIZE_TRAIN 256 INPUT.MIN_SIZE_TEST 160
    INPUT.MAX_SIZE_TEST 256 DATALOADER.NUM_WORKERS 0)
else
  DEV=cuda AMP=True ARCH=resnet50
  LOSSES=(--compile --device cuda --rounds 10 --loss-reps 10)
  R18=(--device cuda --arch resnet18 --batch 32 --size 224)
  R50=(--device cuda --arch resnet50 --batch 64 --size 224)
  THROUGHPUT=(--device cuda --arch resnet50 --cohort 2 --batch 128 --amp bf16)
  FEED=(--device cuda)
  DET_ITERS=60 VOC_ITERS=80
  VOC_SMALL=(DATALOADER.NUM_WORKERS 4)
fi

SUMMARY=(benchmarks/gpu_check_summary.py "$WORK" "$OUT/gpu_check.json" "$OUT/gpu_check.log")
summary() { "$PY" "${SUMMARY[@]}" >/dev/null; }

# step NAME SECONDS CMD...: run CMD (bounded), log its exit code and time; never stop the check.
step() {
  local name=$1 limit=$2
  shift 2
  if [ "$ONLY" != "  " ] && [[ "$ONLY" != *" $name "* ]]; then return 0; fi
  echo "=== $name ($(date +%T), limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=15 "$limit" "$@"
  local rc=$?
  echo "--- $name: exit $rc after $((SECONDS - t0)) s"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$WORK/steps.tsv"
  summary
}

if [ "$DEV" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$WORK/gpu.txt"
fi
"$PY" -c "import torch, torchvision, detectron2; print('torch', torch.__version__, \
'torchvision', torchvision.__version__, 'detectron2', detectron2.__version__)" | tee "$WORK/versions.txt"

step mcl_terms 150 "$PY" benchmarks/bench_mcl_losses.py "${LOSSES[@]}" --out "$WORK/mcl_losses.json"
step cohort_r18 150 "$PY" benchmarks/bench_cohort_step.py "${R18[@]}" --out "$WORK/cohort_r18.json"
step cohort_r50 180 "$PY" benchmarks/bench_cohort_step.py "${R50[@]}" --out "$WORK/cohort_r50.json"
step throughput 180 "$PY" benchmarks/gpu_pretrain.py "${THROUGHPUT[@]}" --out "$WORK/throughput.json"
step feed 300 "$PY" benchmarks/bench_data.py "${FEED[@]}" --out "$WORK/feed.json"

step toy_data 120 "$PY" tools/make_toy_data.py --root "$DATA"
# 1-process torchrun: the env:// process group (NCCL on the GPU) is joined, as for N processes
LAUNCH=(-m torch.distributed.run --standalone --nproc_per_node 1 pretrain/main.py
  --config-file pretrain/configs/toy.yaml --amp bf16)
PRETRAIN=(DEVICE "$DEV" DATA.ROOT "$DATA/imagenet" MODEL.ARCH "$ARCH" SOLVER.EPOCHS 50
  MONITOR.PROGRESS False MONITOR.EVAL_PERIOD 0 OUTPUT_DIR "$PRE")
step torchrun 180 "$PY" "${LAUNCH[@]}" "${PRETRAIN[@]}" SOLVER.MAX_ITER 6
step torchrun_resume 180 "$PY" "${LAUNCH[@]}" --resume "${PRETRAIN[@]}" SOLVER.MAX_ITER 12
step convert 120 "$PY" tools/convert_to_d2.py "$PRE/checkpoint_last.pth" "$WORK/member0.pkl" \
  --member 0 --quiet

# the MoCo VOC protocol's model at full input size (480-800 px train, 800 test), 2 images/iter
VOC=(--config-file detection_configs/voc_faster_rcnn_mcl.yaml MODEL.WEIGHTS "$WORK/member0.pkl"
  SOLVER.IMS_PER_BATCH 2 SOLVER.BASE_LR 0.0025 SOLVER.MAX_ITER "$VOC_ITERS" SOLVER.WARMUP_ITERS 10
  SOLVER.STEPS "(100000,)" SOLVER.CHECKPOINT_PERIOD 100000 TEST.PRECISE_BN.ENABLED False
  MODEL.DEVICE "$DEV" "${VOC_SMALL[@]}")
step voc_r50c4 300 "$PY" tools/train_net.py "${VOC[@]}" OUTPUT_DIR "$WORK/det_voc_r50c4"
DET=(SOLVER.AMP.ENABLED "$AMP" SOLVER.MAX_ITER "$DET_ITERS" SOLVER.CHECKPOINT_PERIOD 100000
  MODEL.DEVICE "$DEV")
step toy_voc_amp 240 "$PY" tools/train_net.py \
  --config-file detection_configs/toy_voc_faster_rcnn_r18_fpn.yaml "${DET[@]}" \
  OUTPUT_DIR "$WORK/det_toy_voc"
step toy_coco_amp 240 "$PY" tools/train_net.py \
  --config-file detection_configs/toy_coco_mask_rcnn_r18_fpn.yaml "${DET[@]}" \
  OUTPUT_DIR "$WORK/det_toy_coco"
step voc_r50c4_amp 300 "$PY" tools/train_net.py "${VOC[@]}" SOLVER.AMP.ENABLED "$AMP" \
  OUTPUT_DIR "$WORK/det_voc_r50c4_amp"

"$PY" "${SUMMARY[@]}"
