#!/usr/bin/env bash
# One GPU session of echofast: build, every GPU test and check, every benchmark, one summary.
#
# On the dev machine, once (needs pip access; the GPU machine has no network and lacks
# diffusers and PyAV):
#     bash bench/gpu_session.sh --fetch-wheels       # -> .whl/ (git-ignored via .git/info/exclude)
# Then with the device tool, from the repository root, the same command until it prints DONE:
#     run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
# Every command may run at most 10 minutes, the whole session about 25. So the steps run in a
# detached worker (setsid) on the device machine, and each call waits for it (up to
# GPU_SESSION_WAIT_S, default 570 s), copies what is finished to $OUT and returns. Call again
# at once: the machine is given back about 30 s after a call returns, and a fresh machine
# starts over (build included). `SKIP=tests_gpu,attention bash bench/gpu_session.sh` skips steps
# whose results already came back. Steps carry on past failures; each has a time cap and the
# worker stops starting steps after GPU_SESSION_DEADLINE_S (default 1440 s).
# GPU_SESSION_STEPS="bench_b1 bench_b8" runs only those steps (in the order given).
#
# What comes back ($OUT): gpu_session_summary.txt (the table printed last), gpu_session.log
# (all output), gpu_session_results.tar.gz (bench/results/*_<card>.csv written here, per-step
# logs). Unpack here with: tar -xzf gpu_session_results.tar.gz -C <repo root>
#
# Steps (name: what, time cap in s):
#   build        ECHOFAST_FORCE_CUDA=1 pip install . (no deps, no network), then echofast info
#   tests_gpu    pytest on the test files that use CUDA (auto-detected) + tests/test_extension.py
#   tests_triton pytest tests/triton under TRITON_INTERPRET=1 (its CUDA-tensor cases included)
#   bench_b1     echofast bench --batch-size 1 (+ --graphs --compile-echofast) -> echofast_bench_<card>.csv
#   bench_b8     echofast bench --batch-size 8 (+ --graphs)      -> echofast_bench_<card>.csv
#   group_norm   bench/bench_group_norm.py                       -> group_norm_<card>.csv
#   attention    bench/bench_attention.py                        -> attention_<card>.csv
#   video        bench/bench_video.py --device cuda              -> video_<card>.csv
#   patch        bench/bench_patch.py (if present)               -> patch_<card>.csv
#   precision    bench/bench_precision.py (fp16/bf16 vs fp32, 100 demo videos) -> precision_<card>.csv
set -uo pipefail

ALL_STEPS="build tests_gpu tests_triton bench_b1 bench_b8 group_norm attention video patch precision"
read -r -a STEPS <<<"${GPU_SESSION_STEPS:-$ALL_STEPS}"
declare -A CAP=([build]=420 [tests_gpu]=300 [tests_triton]=300 [bench_b1]=540 [bench_b8]=480
                [group_norm]=150 [attention]=200 [video]=200 [patch]=300 [precision]=300)

for step in "${STEPS[@]}"; do
    if [[ " $ALL_STEPS " != *" $step "* ]]; then
        echo "gpu_session.sh: unknown step '$step' in GPU_SESSION_STEPS (steps: $ALL_STEPS)" >&2
        exit 2
    fi
done

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
REPO="$(dirname "$(dirname "$SELF")")"
STATE="${GPU_SESSION_STATE:-/tmp/echofast_gpu_session}"
PY="${PYTHON:-python3}"
WAIT_S="${GPU_SESSION_WAIT_S:-570}"
DEADLINE_S="${GPU_SESSION_DEADLINE_S:-1440}"

fetch_wheels() {
    # diffusers (pure Python) and PyAV (manylinux) for the device's CPython 3.12, the versions
    # installed here when they are.
    local dest="${GPU_SESSION_WHEELS:-$REPO/.whl}"
    mkdir -p "$dest" || return 1
    if [[ "$dest" == "$REPO/.whl" ]]; then
        grep -qxF '/.whl/' "$REPO/.git/info/exclude" 2>/dev/null ||
            echo '/.whl/' >>"$REPO/.git/info/exclude"
    fi
    local pkgs=() dist v
    for dist in diffusers av; do
        v="$("$PY" -c "import importlib.metadata as m; print(m.version('$dist'))" 2>/dev/null)"
        pkgs+=("${dist}${v:+==$v}")
    done
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest" "${pkgs[@]}"
    ls -la "$dest"
}

now() { date +%s; }

log() { echo "[$(date +%H:%M:%S)] $*"; }

card_slug() {
    "$PY" -c "import re, torch; n = torch.cuda.get_device_name() if torch.cuda.is_available() \
else 'cpu'; print(re.sub(r'[^a-z0-9]+', '-', n.lower()).strip('-'))"
}

source_hash() {
    (cd "$REPO" && find echofast csrc kernels setup.py pyproject.toml -type f \
        ! -name '*.pyc' ! -name '*.so' -print0 2>/dev/null | sort -z | xargs -0 sha256sum) |
        sha256sum | cut -c1-16
}

# ---- the steps (run by the worker, cwd = repo root, installed package on the path) ----------

step_build() {
    local want
    want="$(source_hash)"
    if [[ -f "$STATE/built" && "$(cat "$STATE/built")" == "$want" ]]; then
        log "build: unchanged sources, already installed"
        return 0
    fi
    nvidia-smi || true
    ECHOFAST_FORCE_CUDA=1 "$PY" -m pip install -v --no-deps --no-build-isolation --no-index \
        --no-cache-dir . 2>&1 | grep -E "echofast build|error|Error|Successfully" || return 1
    (cd /tmp && "$PY" -m echofast.info) || return 1
    echo "$want" >"$STATE/built"
}

pytest_cmd() {
    # -P: the source tree must not shadow the installed package (kernels/, the extension)
    local xdist=()
    if "$PY" -c "import xdist" 2>/dev/null; then xdist=(-n "${1}"); fi
    shift
    "$PY" -P -m pytest -q -p no:cacheprovider "${xdist[@]}" "$@"
}

step_tests_gpu() {
    local files
    mapfile -t files < <(cd "$REPO" && grep -rlE \
        'torch\.cuda\.|mark\.gpu|"cuda"|\.cuda\(\)|FORCE_CUDA' tests --include='test_*.py' |
        grep -v '^tests/triton/' | sort)
    files+=(tests/test_extension.py)
    mapfile -t files < <(printf '%s\n' "${files[@]}" | sort -u)
    log "tests_gpu: ${files[*]}"
    ECHOFAST_FORCE_CUDA=1 pytest_cmd 4 "${files[@]}"
}

step_tests_triton() {
    TRITON_INTERPRET=1 pytest_cmd 8 tests/triton
}

step_bench() {
    local batch="$1"
    shift
    local cmd=(echofast bench)
    if ! (cd /tmp && echofast bench --help >/dev/null 2>&1); then
        log "'echofast bench' is not registered in echofast/cli.py yet: python -m echofast.benchmark"
        cmd=("$PY" -m echofast.benchmark)
    fi
    (cd /tmp && "${cmd[@]}" --device cuda --batch-size "$batch" --graphs --no-progress "$@" \
        --out "$REPO/bench/results/echofast_bench_${SLUG}.csv")
}

step_bench_b1() { step_bench 1 --compile-echofast; }
step_bench_b8() { step_bench 8; }

bench_script() {
    local script="$1"
    shift
    if [[ ! -f "$REPO/bench/$script" ]]; then
        log "bench/$script is not in this tree: skipped"
        return 3
    fi
    "$PY" "bench/$script" "$@"
}

step_group_norm() { bench_script bench_group_norm.py --csv "bench/results/group_norm_${SLUG}.csv"; }
step_attention() { bench_script bench_attention.py --csv "bench/results/attention_${SLUG}.csv"; }
step_video() {
    bench_script bench_video.py --device cuda --csv "bench/results/video_${SLUG}.csv"
}
step_patch() { bench_script bench_patch.py --csv "bench/results/patch_${SLUG}.csv"; }
step_precision() {
    bench_script bench_precision.py --num-videos 100 --frames 64 --steps 64 \
        --csv "bench/results/precision_${SLUG}.csv"
}

# ---- worker --------------------------------------------------------------------------------

worker() {
    cd "$REPO" || exit 1
    local start
    start="$(now)"
    if [[ -d "$REPO/.whl" ]] && compgen -G "$REPO/.whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$REPO"/.whl/*.whl && export PYTHONPATH=/tmp/site
    else
        log "no .whl/ carried: diffusers/PyAV may be missing (see --fetch-wheels)"
    fi
    SLUG="$(card_slug)"
    export SLUG
    echo "$SLUG" >"$STATE/slug"
    log "card $SLUG; $("$PY" -c 'import torch, sys; print("python", sys.version.split()[0], \
"torch", torch.__version__, "cuda", torch.version.cuda)')"
    mkdir -p "$REPO/bench/results" "$STATE/logs"
    local skip=",${SKIP:-},"
    for step in "${STEPS[@]}"; do
        [[ -f "$STATE/status.$step" ]] && continue  # finished in an earlier call
        if [[ "$skip" == *",$step,"* ]]; then
            echo "skipped 0 SKIP" >"$STATE/status.$step"
            continue
        fi
        local left=$((DEADLINE_S - ($(now) - start)))
        local cap="${CAP[$step]}"
        ((cap > left)) && cap="$left"
        if ((cap < 60)); then
            echo "not-run 0 session-deadline" >"$STATE/status.$step"
            continue
        fi
        log "=== $step (cap ${cap}s)"
        echo "$step" >"$STATE/current"
        local t0 rc status
        t0="$(now)"
        timeout --signal=TERM --kill-after=20 "$cap" bash "$SELF" --step "$step" \
            >"$STATE/logs/$step.log" 2>&1
        rc=$?
        case "$rc" in
            0) status=ok ;;
            3) status=skipped ;;
            124 | 137) status=TIMEOUT ;;
            *) status=FAIL ;;
        esac
        tail -n 40 "$STATE/logs/$step.log"
        echo "$status $(($(now) - t0)) rc=$rc" >"$STATE/status.$step"
        log "=== $step: $status in $(($(now) - t0)) s"
    done
    rm -f "$STATE/current"
    touch "$STATE/done"
}

summary() {
    echo
    echo "echofast GPU session: card $(cat "$STATE/slug" 2>/dev/null || echo '?'), git $(cd \
        "$REPO" && git describe --always --dirty 2>/dev/null || echo '?')"
    printf '%-14s %-9s %8s  %s\n' step status seconds note
    for step in "${STEPS[@]}"; do
        if [[ -f "$STATE/status.$step" ]]; then
            read -r status secs note <"$STATE/status.$step"
        elif [[ "$(cat "$STATE/current" 2>/dev/null)" == "$step" ]]; then
            status=running secs=- note=""
        else
            status=pending secs=- note=""
        fi
        printf '%-14s %-9s %8s  %s\n' "$step" "$status" "$secs" "$note"
    done
    local slug
    slug="$(cat "$STATE/slug" 2>/dev/null)"
    if [[ -n "$slug" ]]; then
        echo
        echo "CSV files for this card:"
        ls -l "$REPO"/bench/results/*_"$slug".csv 2>/dev/null | awk '{print "  " $NF, $5 " bytes"}'
    fi
}

collect() {
    # what comes back: at most 8 files, so one archive + the log + the summary
    local out="${OUT:-$STATE/out}"
    mkdir -p "$out"
    summary >"$out/gpu_session_summary.txt"
    cp "$STATE/worker.log" "$out/gpu_session.log" 2>/dev/null
    local slug
    slug="$(cat "$STATE/slug" 2>/dev/null)"
    local files=()
    if [[ -n "$slug" ]]; then
        mapfile -t files < <(cd "$REPO" && ls bench/results/*_"$slug".csv 2>/dev/null)
    fi
    (cd "$REPO" && tar -czf "$out/gpu_session_results.tar.gz" "${files[@]}" \
        -C "$STATE" logs 2>/dev/null)
}

attach() {
    mkdir -p "$STATE"
    if [[ -f "$STATE/done" ]]; then
        log "the session's steps are finished on this machine"
    elif [[ -f "$STATE/pid" ]] && kill -0 "$(cat "$STATE/pid")" 2>/dev/null; then
        log "attaching to the running worker (pid $(cat "$STATE/pid"))"
    else
        log "starting the worker (log: $STATE/worker.log)"
        setsid nohup bash "$SELF" --worker >>"$STATE/worker.log" 2>&1 </dev/null &
        echo $! >"$STATE/pid"
    fi
    local t0 shown=0
    t0="$(now)"
    while [[ ! -f "$STATE/done" ]] && (($(now) - t0 < WAIT_S)); do
        if ! kill -0 "$(cat "$STATE/pid")" 2>/dev/null; then
            log "the worker is gone before finishing (see the log above)"
            break
        fi
        sleep 5
        local lines
        lines="$(wc -l <"$STATE/worker.log")"
        if ((lines > shown)); then
            sed -n "$((shown + 1)),${lines}p" "$STATE/worker.log"
            shown="$lines"
        fi
    done
    collect
    cat "${OUT:-$STATE/out}/gpu_session_summary.txt"
    if [[ -f "$STATE/done" ]]; then
        echo "DONE: results in \$OUT/gpu_session_results.tar.gz"
    elif kill -0 "$(cat "$STATE/pid")" 2>/dev/null; then
        echo "NOT DONE: call the same command again now (the worker keeps running)"
    else
        echo "STOPPED: the worker ended early; the same command starts it again (finished steps"
        echo "are kept on this machine)"
        rm -f "$STATE/pid"
    fi
}

case "${1:-}" in
    --fetch-wheels) fetch_wheels ;;
    --worker) mkdir -p "$STATE" && worker ;;
    --step)
        cd "$REPO" || exit 1
        SLUG="${SLUG:-$(cat "$STATE/slug")}"
        "step_$2"
        ;;
    "") attach ;;
    *)
        sed -n '2,31p' "$SELF"
        exit 2
        ;;
esac
