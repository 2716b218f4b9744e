#!/usr/bin/env bash
# `make demo`: install, convert the embedded model, fine-tune it on the dates task, compare base /
# tuned / base + 3 shots (first and nearest); then a table of how long each phase took on this machine.
set -euo pipefail
VENV=${VENV:-.venv}
BIN=$VENV/bin
RUN=runs/quickstart
declare -a NAMES SECONDS_TAKEN
now() { date +%s.%N; }
phase() {  # phase NAME COMMAND...: runs it and records its wall time
    local name=$1 t0
    shift
    t0=$(now)
    "$@"
    NAMES+=("$name")
    SECONDS_TAKEN+=("$(awk "BEGIN { print $(now) - $t0 }")")
}

phase "venv + install" make --no-print-directory "$VENV/.sftkit-installed"
phase "model conversion" "$BIN/python" -c "from sftkit.models import resolve; resolve('smollm2-135m')"
phase "training" "$BIN/sftkit" train configs/quickstart.yaml --overwrite
phase "comparison" "$BIN/sftkit" compare smollm2-135m "$RUN" --data examples/dates/eval.jsonl --few-shot 3 \
    --metrics exact_match --max-new-tokens 12 --batch-size 200

{
    echo "make demo, phase by phase (wall seconds on this machine):"
    total=0
    for i in "${!NAMES[@]}"; do
        printf "  %-22s %7.1f\n" "${NAMES[$i]}" "${SECONDS_TAKEN[$i]}"
        total=$(awk "BEGIN { print $total + ${SECONDS_TAKEN[$i]} }")
    done
    printf "  %-22s %7.1f\n" "training + comparison" "$(awk "BEGIN { print ${SECONDS_TAKEN[2]} + ${SECONDS_TAKEN[3]} }")"
    printf "  %-22s %7.1f\n" "all told" "$total"
    "$BIN/python" - <<'PY'
import time
import torch
a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
for _ in range(3):
    a @ b
t = time.perf_counter()
for _ in range(10):
    a @ b
print(f"  (this machine today: fp32 2048x2048 matmul at {2 * 2048**3 * 10 / (time.perf_counter() - t) / 1e9:.0f} GFLOP/s, "
      f"{torch.get_num_threads()} threads)")
PY
} | tee "$RUN/demo_timing.txt"
