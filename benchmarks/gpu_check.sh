#!/usr/bin/env bash
# GPU check, one short run on a CUDA machine from the repository root (budget: under 8 minutes on one GPU):
#   1. the mLSTM kernels on CUDA (fp32, bf16, fp16 autocast) against fp64, and an AMP training step of the shipped
#      ViL-T + UperNet config (benchmarks/gpu_check.py); a ViL-T layer's gradients under autocast as its forget gates
#      decay faster (benchmarks/autocast_gate_gradients.py);
#   2. benchmarks/vil_speed.py on the GPU: backbones up to 4096^2, segmentors at 512^2 and 1024^2;
#   3. the compiled ViL-T config against eager ViL-T and SDPA DeiT-T at 512^2, alternating in one process
#      (benchmarks/speed_alternating.py; the first step, apart, includes the compile; its table is rewritten after
#      every round).
# Writes benchmarks/results/gpu/ (commit it), each part's output in a .log beside its table. PYTHON selects the
# interpreter (default: .venv/bin/python if present).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
OUT=${OUT_DIR:-benchmarks/results/gpu}
mkdir -p "$OUT"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA device here')" || exit 2
status=0
# each part under its time limit, its output also kept in OUT/NAME.log (a part cut short leaves what it printed)
part() {
    local limit=$1 name=$2
    shift 2
    rm -f "$OUT/$name.md" "$OUT/$name.json" "$OUT/$name.log"
    timeout "$limit" "$PY" "$@" 2>&1 | tee "$OUT/$name.log" || status=1
}
# a vil_speed.py run cut short has saved every finished cell in its JSON: render those into the table
speed() {
    local limit=$1 name=$2
    shift 2
    part "$limit" "$name" benchmarks/vil_speed.py --out-dir "$OUT" --name "$name" "$@"
    if [ ! -f "$OUT/$name.md" ] && [ -f "$OUT/$name.json" ]; then
        "$PY" benchmarks/vil_speed.py --render "$OUT/$name.json" || status=1
    fi
}
part 110 gpu_check benchmarks/gpu_check.py --out-dir "$OUT"
part 30 autocast_gate_gradients benchmarks/autocast_gate_gradients.py --device cuda \
    --forget-gate-biases init 1 -1 -3 -6 --dtypes bfloat16 float16 --out-dir "$OUT"
speed 150 vil_speed_backbone --parts backbone --models vil_t deit_t_sdpa swin_t --sizes 512 1024 2048 4096 \
    --repeats 5 --cell-timeout-s 60 --threads 8
speed 100 vil_speed_segmentor --parts segmentor --modes train --models vil_t deit_t deit_t_sdpa swin_t \
    --sizes 512 1024 --segmentor-max-size 1024 --repeats 3 --cell-timeout-s 40 --threads 8
part 90 speed_alternating_compiled benchmarks/speed_alternating.py --out-dir "$OUT" --name speed_alternating_compiled \
    --models vil_t vil_t_compiled deit_t_sdpa --reference deit_t_sdpa --sizes 512 --rounds 3 --threads 8
exit $status
