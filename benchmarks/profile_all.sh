#!/usr/bin/env bash
# Reproduce benchmarks/results/profile_memory_{2d,2d_rest,2d_extra,3d}.{csv,json,png} and profile_memory.md.
#
# CPU run: real measurements where the fake-tensor estimate fits under --max-mem-gb, estimates (same step on fake
# tensors) for the rest; 2D sizes 256..2048 (training for real at 256^2, inference for real at 256^2 and 2048^2:
# the 2048^2 inference time is quoted in the README), 3D sizes 64^3..256^3 (training for real up to 96^3, inference up
# to 128^3); the 80 GiB search estimates the training step around the out-of-memory boundary (a search step that
# times out leaves the boundary extrapolated from the fitted growth law). The committed results ran one sweep at a
# time on an idle 2-core machine: do not run two at once (torch's threads then wait on each other, see README).
#
# Every model is built from a shipped config (tools/profile_memory.py --list-models: vil-t is
# configs/vil_upernet_ade20k.py's backbone, vil-t+upernet its whole segmentor; the 3D names are configs/medical/*).
# 2D segmentors use the configs' ChunkedLoss heads (mmseg's UPerHead / FCNHead, loss computed in bands of rows) unless
# --head-loss mmseg; one estimate sweep keeps mmseg's heads for comparison.
#
#   bash benchmarks/profile_all.sh            # about 1.5 hours on 2 CPU cores (SWEEPS="rest extra" runs those two only)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/results}
COMMON=(--max-mem-gb 12 --repeats 3 --max-repeat-seconds 30 --oom-search-gb 80 --oom-search-timeout 300
        --timeout 1800 --out-dir "$OUT")

SWEEPS=${SWEEPS:-"2d mmseg_heads rest extra 3d"}  # which sweeps to run (the report reads all five JSON files)
run() { [[ " $SWEEPS " == *" $1 "* ]]; }

# the main comparison: ViL-T and DeiT-T (mmseg's ViT as shipped), backbone and +UperNet, in one sweep
run 2d && "$PY" tools/profile_memory.py --models vil-t+upernet deit-t+upernet vil-t deit-t \
  --sizes 256 512 1024 2048 --real-sizes 256 2048 --real-train-sizes 256 \
  --batch 2 --infer-batch 1 --num-classes 150 --prefix profile_memory_2d "${COMMON[@]}"
# the same two segmentors with mmseg's own UPerHead / FCNHead (full-resolution logits in the loss): estimates only
run mmseg_heads && "$PY" tools/profile_memory.py --models vil-t+upernet deit-t+upernet --head-loss mmseg \
  --sizes 256 512 1024 2048 --batch 2 --infer-batch 1 --num-classes 150 --estimate --steps train \
  --max-mem-gb 12 --timeout 1800 --out-dir "$OUT" --prefix profile_memory_2d_mmseg_heads
# the other 2D models: estimates only (no timings)
run rest && "$PY" tools/profile_memory.py --models deit-t-sdpa swin-t deit-t-sdpa+upernet swin-t+upernet \
  --sizes 256 512 1024 2048 --batch 2 --infer-batch 1 --num-classes 150 --estimate \
  --prefix profile_memory_2d_rest "${COMMON[@]}"
run extra && "$PY" tools/profile_memory.py --models sequencer2d-s lambdaresnet50 sequencer2d-s+upernet \
  lambdaresnet50+upernet --sizes 256 512 1024 2048 --batch 2 --infer-batch 1 --num-classes 150 --estimate \
  --prefix profile_memory_2d_extra "${COMMON[@]}"
# 3D: the shipped MNI152 configs' networks (their 3 classes)
run 3d && "$PY" tools/profile_memory.py --models vil-unetr unetr swin-unetr \
  --sizes-3d 64 96 128 160 192 256 --real-sizes-3d 64 96 128 --real-train-sizes-3d 64 96 \
  --batch-3d 1 --infer-batch-3d 1 --prefix profile_memory_3d "${COMMON[@]}"
"$PY" -m vilseg.profiling.report "$OUT/profile_memory_2d.json" "$OUT/profile_memory_3d.json" \
  "$OUT/profile_memory_2d_mmseg_heads.json" "$OUT/profile_memory_2d_rest.json" "$OUT/profile_memory_2d_extra.json" \
  --out "$OUT/profile_memory.md"
