#!/usr/bin/env bash
# One GPU session in one call: get the CUDA extension, run the CUDA tests, the
# benchmarks and the sanitizers, and print a short summary last. Every stage
# has a time limit and the whole script a deadline (DEADLINE_S, default 540 s),
# so it ends inside one device call (600 s) and, with the machine's start,
# inside a 15-minute device budget. Stages run in order of value; one that
# would start with under 15 s left is skipped and the summary says so.
#
# On the device tool (repo root; the image has torch 2.11 + CUDA 13, Python 3.12):
#   carry:   [".whl", "memfast/_C.cpython-312-x86_64-linux-gnu.so"]   (both git-ignored)
#   command: bash bench/gpu_session.sh
# `make gpu-prebuild` makes that .so on the CPU machine against torch 2.11.0+cu130
# (the image's build) and `make gpu-wheels` fetches Liger; without the .so, or if
# it does not run, the script builds the extension on the GPU machine (~1 min).
# Logs land in $OUT (at most 8 files come back): ext.log tests.log bench.log
# bench.json compile.log other.log sanitizer.log summary.md.
#
# DRY=1 bash bench/gpu_session.sh   checks the script on a machine without a GPU:
# CPU kernels, --device cpu --smoke benchmarks, the CUDA tests skip.
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
DEADLINE_S=${DEADLINE_S:-540}
DRY=${DRY:-0}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
SUMMARY="$OUT/summary.md"
STAGES="$OUT/stages.tmp"
printf '| stage | rc | seconds | limit s |\n|---|---|---|---|\n' > "$STAGES"
if [ "$DRY" = 1 ]; then
    DEV=(--device cpu --smoke); SCALE=(--smoke); LINEAR=(--device cpu --tokens 1024 --hidden 32 --vocab 1000)
else
    DEV=(); SCALE=(--device cuda --samples 100000000)
    LINEAR=(--device cuda --dtype bf16 --tokens 16384 --hidden 4096 --vocab 128256 --repeats 3)
fi

elapsed() { echo $(( $(date +%s) - START )); }

# stage NAME LOG LIMIT_S COMMAND...: runs COMMAND for at most min(LIMIT_S, time left), output appended to LOG.
stage() {
    local name=$1 log=$2 limit=$3; shift 3
    local left=$(( DEADLINE_S - $(elapsed) ))
    if (( left < 15 )); then
        echo "| $name | skipped: deadline | 0 | $limit |" >> "$STAGES"
        echo "== $name: skipped, ${left} s left before the deadline"
        return 0
    fi
    (( limit > left )) && limit=$left
    local t0 rc
    t0=$(date +%s)
    echo "== $name (limit ${limit} s): $*" | tee -a "$OUT/$log"
    timeout -k 10 "$limit" "$@" >> "$OUT/$log" 2>&1
    rc=$?
    (( rc == 124 || rc == 137 )) && rc="$rc (timed out)"
    echo "| $name | $rc | $(( $(date +%s) - t0 )) | $limit |" >> "$STAGES"
    echo "== $name: rc $rc after $(( $(date +%s) - t0 )) s"
}

# The extension must load, be built for this torch and run a CUDA launch (a carried
# binary that only loads proves little).
extension_ok() {
    "$PY" - "$DRY" <<'EOF'
import sys, torch, memfast
dry = sys.argv[1] == "1"
info = memfast.build_info()
print("build_info", info, "| torch", torch.__version__, torch.version.git_version)
ok = bool(info and info["torch"] == torch.__version__.split("+")[0] and (dry or info["with_cuda"]))
device = "cpu" if dry else "cuda"
if ok:
    x = torch.randn(4, 10, device=device, requires_grad=True)
    y = torch.randint(0, 10, (4,), device=device)
    torch.testing.assert_close(memfast.cross_entropy(x, y), torch.nn.functional.cross_entropy(x, y))
    print("extension runs on", device)
sys.exit(0 if ok else 1)
EOF
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.version.git_version, 'cuda', torch.version.cuda)"
    echo "cpus $(nproc)"
} > "$OUT/ext.log" 2>&1
if extension_ok >> "$OUT/ext.log" 2>&1; then
    echo "| extension | 0: carried build runs | $(elapsed) | - |" >> "$STAGES"
else
    echo "== no usable carried extension: building" | tee -a "$OUT/ext.log"
    stage build ext.log 240 env MEMFAST_CUDA=$(( 1 - DRY )) TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" \
        "$PY" setup.py build_ext --inplace --force --build-temp /tmp/memfast-build
    if ! extension_ok >> "$OUT/ext.log" 2>&1; then
        echo "no usable memfast extension; the end of ext.log:"; tail -n 40 "$OUT/ext.log"; cat "$STAGES"
        exit 1
    fi
fi

if ls .whl/liger_kernel-*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/liger-site .whl/liger_kernel-*.whl \
        >> "$OUT/ext.log" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/liger-site"
fi

# 1. Correctness: every CUDA test, CPU-vs-CUDA curvature, the MAT CUDA cases, opcheck, CUDA graphs, compile.
stage tests tests.log 200 "$PY" -m pytest -q -rfE -p no:cacheprovider --maxfail=25 \
    tests/test_cuda_cross_entropy.py tests/test_curvature.py tests/test_mat.py tests/test_ops.py
# 2. Against eager and Liger, every case (the compile peers come last: each compiles per shape).
stage bench bench.log 130 "$PY" bench/gpu.py "${DEV[@]}" --methods memfast,inplace,eager,liger --budget-s 100 \
    --json "$OUT/bench.json"
# 3. Curvature (ResNet18, B=128, 10 probes) and the scale figures (100M-sample tracker).
stage curvature other.log 60 "$PY" bench/gpu_curvature.py "${DEV[@]}" --reps "$(( DRY ? 1 : 10 ))"
stage scale other.log 40 "$PY" bench/scale.py "${SCALE[@]}"
# 4. Sanitizers on a few small tests (compute-sanitizer refuses some virtualised GPUs: the log says so).
if [ "$DRY" = 1 ]; then  # no GPU, no compute-sanitizer
    printf '| memcheck | skipped: DRY | 0 | 60 |\n| racecheck | skipped: DRY | 0 | 45 |\n' >> "$STAGES"
else
    stage memcheck sanitizer.log 60 compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" -m pytest -q -x \
        -p no:cacheprovider tests/test_cuda_cross_entropy.py \
        -k "test_forward_matches_reference and (10 or 1000) or strided or bad_values or per_sequence or sorted"
    stage racecheck sanitizer.log 45 compute-sanitizer --tool racecheck --error-exitcode 3 "$PY" -m pytest -q -x \
        -p no:cacheprovider tests/test_cuda_cross_entropy.py -k "test_forward_matches_reference and 32000 and float32"
fi
# 5. An LM head's loss: eager vs memfast vs memfast.linear_cross_entropy (time, peak memory).
stage linear other.log 60 "$PY" bench/linear_memory.py "${LINEAR[@]}"
# 6. torch.compile beside memfast on the plain shapes, while time is left.
stage compile compile.log 120 "$PY" bench/gpu.py "${DEV[@]}" --methods memfast,compile --iters 20 --budget-s 90 \
    --only '^[0-9]+ x [0-9]+ [a-z0-9]+$'

{
    echo "## tests"; grep -E "[0-9]+ (passed|failed)" "$OUT/tests.log" | tail -n 2
    grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -n 25
    echo; echo "## bench: memfast, eager, liger"; sed -n '/^Ops alone/,$p' "$OUT/bench.log" | head -n 50
    echo; echo "## compile peers"; sed -n '/median ms of forward/,$p' "$OUT/compile.log" | head -n 20
    echo; echo "## curvature, scale, LM head"; grep -vE "^==" "$OUT/other.log" | tail -n 32
    echo; echo "## sanitizers"; grep -sE "ERROR SUMMARY|[0-9]+ passed|failed|not supported|rror" "$OUT/sanitizer.log" | head -n 12
    echo; echo "## stages: $(elapsed) s of a ${DEADLINE_S} s deadline"; cat "$STAGES"
} > "$SUMMARY" 2>&1
rm -f "$STAGES"
cat "$SUMMARY"
