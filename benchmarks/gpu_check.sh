#!/usr/bin/env bash
# The GPU checks in one short run (a lent H100/H200): the MCL terms' cost against one R18 MoCo step,
# cohort vs one network (step time, memory, MCL-term share), R50x2 bf16 + channels_last
# throughput, and the same fed by real JPEGs through the input pipeline vs synthetic.
# Usage: OUT=/some/dir bash benchmarks/gpu_check.sh   (JSON files land in $OUT)
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY benchmarks/bench_mcl_losses.py --device cuda --rounds 10 --loss-reps 10 --out "$OUT/mcl_losses.json"
$PY benchmarks/bench_cohort_step.py --device cuda --arch resnet18 --batch 32 --size 224 --out "$OUT/cohort_r18_b32.json"
$PY benchmarks/bench_cohort_step.py --device cuda --arch resnet50 --batch 64 --size 224 --out "$OUT/cohort_r50_b64.json"
$PY benchmarks/gpu_pretrain.py --device cuda --arch resnet50 --cohort 2 --batch 128 --amp bf16 --out "$OUT/gpu_pretrain_r50x2_bf16_cl.json"
$PY benchmarks/bench_data.py --device cuda --out "$OUT/bench_data_feed.json"
