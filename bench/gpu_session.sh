#!/usr/bin/env bash
# One GPU session of echofast: build, the GPU checks against their references, the benchmarks,
# one summary. Sized for a device lease of about 15 minutes in all: ONE call of at most 10
# minutes gets the most wanted results, and a second call (only if the lease has time left and
# the machine is still warm) carries on where the first stopped.
#
# On the dev machine, once (needs pip access; the GPU machine has no network and lacks
# diffusers and PyAV):
#     bash bench/gpu_session.sh --fetch-wheels       # -> .whl/ (git-ignored via .git/info/exclude)
#     bash bench/gpu_session.sh --plan               # what would run, in order, with time caps
# Then with the device tool, from the repository root:
#     run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
# The steps run in a detached worker (setsid) that stops starting steps GPU_SESSION_WAIT_S
# (default 540 s) after the call began; the call waits for it, copies what is finished to $OUT
# and returns. It prints DONE when every step has run, else MORE: the same command again at once
# (the machine is given back about 30 s after a call returns) runs the steps not yet run; a fresh
# machine starts over (build included). Steps carry on past failures and each has a time cap.
#   GPU_SESSION_STEPS="bench_b8 precision"  only these steps, in this order
#   SKIP=tests_gpu,attention                skip these (e.g. results that already came back)
#   GPU_SESSION_DRY_RUN=1                   print each step's commands instead of running them
#   ECHOFAST_GIT_SHA=<sha>                  the version the CSV rows name when the copy of the tree
#                                           has no .git (pass `git describe --always --dirty`)
#
# What comes back ($OUT): gpu_session_summary.txt (printed last: step table, benchmark table),
# gpu_session.log (all output), gpu_session_results.tar.gz (bench/results/*_<card>.csv written
# here, a stopped benchmark's *_<card>.partial.csv journal, per-step logs, the GPU tests' JUnit
# XML, and the GEGLU GEMM's tuned table once geglu_tune has run on this machine). Take it in with
#     python bench/ingest_gpu_session.py <each call's gpu_session_results.tar.gz, in order>
# (new CSV rows appended, logs into bench/results/logs_<card>/, the tuned table checked).
#
# Steps, most wanted first (name: what). The H100 lease of 2026-11-26 (git 5f536c1) ran every
# step but bench_compile in three calls on one machine (patch stopped at its cap). The second
# (2026-11-27, git c0b27e8) ran 10 steps in two calls and decided the feed-forward
# (FUSED_FF_DEVICES, FUSED_FF_MAX_DIM) and the GroupNorm rows kernels' two forms
# (kernels.group_norm.DENSE_MULTIPLE) from microbenchmarks; the third (2026-11-27, git 3a36557)
# timed those end to end in two calls of 522 and 202 s: build 23, bench_b1 146, tests_gpu 128,
# group_norm 89, feed_forward 16, geglu 23, bench_b8 68, unet_compile stopped at 179 s before its
# compiled-diffusers row (it also profiled four echofast paths bench_b1 had profiled; now
# --no-profile). So now: the batch-1 benchmark right after the build (any change since, end to
# end), the GPU tests, the compiled-diffusers ratio (last measured in the first lease), batch 8,
# the steps no lease has run since the first, the precision check, then the microbenchmarks that
# decide code paths (group_norm: kernels.group_norm.RowsPlan.of, DENSE_MULTIPLE; feed_forward;
# geglu: FUSED_GEGLU_DEVICES; the third lease confirmed each choice), and the GEGLU re-tuning
# last but one (every step after it runs the tiles it chose).
#   build         ECHOFAST_FORCE_CUDA=1 pip install . (no deps, no network; falls back to a build
#                 without the CUDA sources if nvcc fails, and the step then reports FAIL)
#   geglu_tune    bench/tune_geglu_linear.py --budget-s 150: the GEGLU GEMM's tile candidates at
#                 the LVDM's call sites (5 and 40 windows) -> geglu_tune_<card>.csv; the winners
#                 (>= 3 % faster than the default) into kernels/geglu_linear_tuned.json, which
#                 comes back in the archive (commit it), then pip install . again
#   bench_b1      echofast bench --batch-size 1 --graphs --no-compile --decode-dtype float16
#                 --temporal-gemms: s/video (fp32 and fp16 VAE decode), vs the reference's way,
#                 kernels per UNet call, TFLOP/s vs a bf16 GEMM, and the pipeline and step call
#                 with the three-GEMM temporal convolutions (TEMPORAL_GEMMS_MAX_DIM) beside them
#                 -> echofast_bench_<card>.csv (cap 230 s: the third lease took 146 s without them)
#   tests_gpu     pytest -m gpu: every GPU test (compiled Triton kernels and models vs their
#                 references, CUDA graphs, video path), then tests/test_extension.py
#   unet_compile  echofast bench --batch-size 1 --graphs --compile --no-pipeline: single UNet
#                 calls vs torch.compile'd diffusers (one inductor compile)
#   precision     bench/bench_precision.py: fp16/bf16 vs fp32 latents, non-finite count, 100 videos
#   bench_b8      bench_b1 at --batch-size 8 (one warm-up, one timed run): videos/s; without the
#                 diffusers baselines (bench_b1 has the ratios; the reference's way at batch 8
#                 would take ~100 s of the call)
#   group_norm    bench/bench_group_norm.py --providers echofast_triton,echofast_triton_groups,eager
#                 (eager and CUDA-graph times)                    -> group_norm_<card>.csv
#   geglu         bench/bench_geglu.py --providers echofast_triton,eager (and projection+geglu:
#                 cuBLAS + GEGLU kernel vs the fused GEMM)        -> geglu_<card>.csv
#   feed_forward  bench/bench_feed_forward.py: the one-kernel feed-forward vs the two-GEMM path at
#                 the LVDM's sites (5 and 40 windows)  -> feed_forward_<card>.csv; decides
#                 FUSED_FF_DEVICES
#   temporal_conv bench/bench_temporal_conv.py: the temporal resnets' (3,1,1) convolution as the
#                 models' Conv2d vs Conv3d (two layouts) vs three cuBLAS GEMMs at the LVDM's sites
#                 -> temporal_conv_<card>.csv; its last lines name the settings that follow
#                 (TEMPORAL_GEMMS_DEVICES, TEMPORAL_GEMMS_MAX_DIM; bench_b1 timed them end to end)
#   layer_norm    bench/bench_layer_norm.py (vs the autocast round trip) -> layer_norm_<card>.csv
#   attention     bench/bench_attention.py --sweep (the kernel's other tiles and grid sizes too,
#                 graph-timed: TILE and PROGRAMS_PER_SM)  -> attention_<card>.csv
#   memory        bench/memory_profile.py --batch-size 1 8: peak GPU memory per pipeline phase
#   video         bench/bench_video.py --device cuda              -> video_<card>.csv
#   patch         bench/bench_patch.py                            -> patch_<card>.csv
#   bench_compile echofast bench --batch-size 1 --graphs --compile --compile-echofast: whole
#                 pipelines compiled (inductor compiles four UNets: the slowest step)
set -uo pipefail

ALL_STEPS="build bench_b1 tests_gpu unet_compile bench_b8 layer_norm attention memory video precision temporal_conv group_norm feed_forward geglu geglu_tune patch bench_compile"
read -r -a STEPS <<<"${GPU_SESSION_STEPS:-$ALL_STEPS}"
declare -A CAP=([build]=240 [geglu_tune]=270 [bench_b1]=230 [bench_b8]=240 [unet_compile]=200 [tests_gpu]=180
                [layer_norm]=90 [group_norm]=90 [attention]=180 [geglu]=90 [feed_forward]=120 [temporal_conv]=60 [precision]=150 [memory]=90
                [video]=90 [patch]=150 [bench_compile]=420)

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
WAIT_S="${GPU_SESSION_WAIT_S:-540}"
POLL_S="${GPU_SESSION_POLL_S:-5}"
DRY="${GPU_SESSION_DRY_RUN:-}"

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

# x CMD...: run a step's command, or with GPU_SESSION_DRY_RUN=1 print it
x() {
    if [[ -n "$DRY" ]]; then
        echo "+ $*"
    else
        "$@"
    fi
}

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

pip_install() {
    x "$PY" -m pip install -v --no-deps --no-build-isolation --no-index --no-cache-dir . \
        >"$STATE/logs/pip_install.log" 2>&1
    local rc=$?
    grep -E "echofast build|error|Error|Successfully" "$STATE/logs/pip_install.log"
    return $rc
}

step_build() {
    local want rc=0
    want="$(source_hash)"
    if [[ -f "$STATE/built" && "$(cat "$STATE/built")" == "$want" ]]; then
        log "build: unchanged sources, already installed"
        return 0
    fi
    x nvidia-smi
    if ! ECHOFAST_FORCE_CUDA=1 pip_install; then
        log "build: the CUDA build failed (above); installing without forcing CUDA so that the" \
            "other steps run, and reporting FAIL"
        pip_install || return 1
        rc=1
    fi
    (cd /tmp && x "$PY" -m echofast.info) || return 1
    # a Triton older than the kernels are checked with is refused by every Triton backend: the
    # kernel measurements would then time the PyTorch fallbacks
    if ! (cd /tmp && x "$PY" -c "import sys; from echofast.ops._triton import triton_too_old as t; sys.exit(t())"); then
        log "build: the Triton backends cannot run with this Triton (above): ops fall back to" \
            "PyTorch, so the kernel benchmarks time the fallbacks; reporting FAIL"
        rc=1
    fi
    echo "$want" >"$STATE/built"
    return $rc
}

pytest_cmd() {
    # -P: the source tree must not shadow the installed package (kernels/, the extension)
    local opts=(-v -p no:cacheprovider -rfE --junitxml="$STATE/logs/$1.xml")
    "$PY" -c "import xdist" 2>/dev/null && opts+=(-n "$2")
    "$PY" -c "import pytest_timeout" 2>/dev/null && opts+=(--timeout 150)
    shift 2
    x "$PY" -P -m pytest "${opts[@]}" "$@"
}

step_tests_gpu() {
    # every test marked gpu (tests/conftest.py refuses a CUDA-skipped test without the marker),
    # then the extension's tests (its build info and device query on a real GPU)
    ECHOFAST_FORCE_CUDA=1 pytest_cmd tests_gpu 8 -m gpu --ignore=tests/triton tests
    local rc=$?
    ECHOFAST_FORCE_CUDA=1 pytest_cmd tests_ext 1 tests/test_extension.py || rc=1
    return $rc
}

step_bench() {
    # against the card's committed rows (copied when this machine's first worker started): a
    # median more than 10 % slower than there is flagged REGRESSION (and the step reports FAIL)
    local cmp=()
    [[ -f "$STATE/baseline.csv" ]] && cmp=(--compare "$STATE/baseline.csv" --threshold 10)
    (cd /tmp && x echofast bench --device cuda --graphs --no-progress "$@" "${cmp[@]}" \
        --out "$REPO/bench/results/echofast_bench_${SLUG}.csv")
}

step_bench_b1() { step_bench --batch-size 1 --no-compile --decode-dtype float16 --temporal-gemms; }
step_bench_b8() {
    step_bench --batch-size 8 --no-compile --no-reference --decode-dtype float16 --repeats 1 \
        --warmup 1
}
step_unet_compile() { step_bench --batch-size 1 --compile --no-pipeline --no-profile; }
step_bench_compile() { step_bench --batch-size 1 --compile --compile-echofast; }

bench_script() {
    local script="$1"
    shift
    x "$PY" "bench/$script" "$@"
}

step_group_norm() {
    bench_script bench_group_norm.py --providers echofast_triton,echofast_triton_groups,eager \
        --csv "bench/results/group_norm_${SLUG}.csv"
}
step_geglu_tune() {
    # the GEGLU GEMM's tile candidates timed at the LVDM's call sites; the winners go into the
    # tree's tuned table, and the package is reinstalled so that every later step runs them
    bench_script tune_geglu_linear.py --budget-s 150 --csv "bench/results/geglu_tune_${SLUG}.csv" \
        --write-table kernels/geglu_linear_tuned.json || return 1
    log "geglu_tune: installing the package again, with the tuned table"
    ECHOFAST_FORCE_CUDA=1 pip_install || return 1
    source_hash >"$STATE/built"
    # kept outside the tree: a later call's fresh copy of the tree has the committed table again
    mkdir -p "$STATE/tuned/kernels"
    cp kernels/geglu_linear_tuned.json "$STATE/tuned/kernels/"
}
step_layer_norm() {
    bench_script bench_layer_norm.py --csv "bench/results/layer_norm_${SLUG}.csv"
}
step_geglu() {
    bench_script bench_geglu.py --providers echofast_triton,eager --csv "bench/results/geglu_${SLUG}.csv"
}
step_feed_forward() {
    bench_script bench_feed_forward.py --csv "bench/results/feed_forward_${SLUG}.csv"
}
step_temporal_conv() {
    bench_script bench_temporal_conv.py --csv "bench/results/temporal_conv_${SLUG}.csv"
}
step_attention() {
    bench_script bench_attention.py --sweep --csv "bench/results/attention_${SLUG}.csv"
}
step_video() {
    bench_script bench_video.py --device cuda --csv "bench/results/video_${SLUG}.csv"
}
step_patch() { bench_script bench_patch.py --csv "bench/results/patch_${SLUG}.csv"; }
step_memory() { bench_script memory_profile.py --batch-size 1 8 --steps 2 --top 8; }
step_precision() {
    bench_script bench_precision.py --num-videos 100 --frames 64 --steps 64 \
        --csv "bench/results/precision_${SLUG}.csv"
}

# ---- worker --------------------------------------------------------------------------------

# a step is final once it ran (ok, FAIL, TIMEOUT) or was skipped; "not-run" steps (no time was
# left in an earlier call) run in the next call
final() { [[ -f "$STATE/status.$1" ]] && [[ "$(cut -d' ' -f1 "$STATE/status.$1")" != not-run ]]; }

all_final() {
    local step
    for step in "${STEPS[@]}"; do final "$step" || return 1; done
}

worker() {
    cd "$REPO" || exit 1
    local deadline="$1"
    if [[ -d "$REPO/.whl" ]] && compgen -G "$REPO/.whl/*.whl" >/dev/null; then
        x "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$REPO"/.whl/*.whl && export PYTHONPATH=/tmp/site
    else
        log "no .whl/ carried: diffusers/PyAV may be missing (see --fetch-wheels)"
    fi
    SLUG="$(card_slug)"
    export SLUG
    echo "$SLUG" >"$STATE/slug"
    local committed="$REPO/bench/results/echofast_bench_${SLUG}.csv"
    [[ -f "$committed" && ! -f "$STATE/baseline.csv" ]] && cp "$committed" "$STATE/baseline.csv"
    log "card $SLUG; $("$PY" -c 'import torch, sys; print("python", sys.version.split()[0], \
"torch", torch.__version__, "cuda", torch.version.cuda)')"
    mkdir -p "$REPO/bench/results" "$STATE/logs"
    local skip=",${SKIP:-},"
    for step in "${STEPS[@]}"; do
        final "$step" && continue # finished in an earlier call
        if [[ "$skip" == *",$step,"* ]]; then
            echo "skipped 0 SKIP" >"$STATE/status.$step"
            continue
        fi
        local left=$((deadline - $(now)))
        local cap="${CAP[$step]}"
        ((cap > left)) && cap="$left"
        if ((cap < 45)); then
            echo "not-run 0 no-time-left-in-this-call" >"$STATE/status.$step"
            continue
        fi
        log "=== $step (cap ${cap}s)"
        echo "$step" >"$STATE/current"
        local t0 rc status
        t0="$(now)"
        timeout --signal=TERM --kill-after=15 "$cap" bash "$SELF" --step "$step" \
            >"$STATE/logs/$step.log" 2>&1
        rc=$?
        case "$rc" in
            0) status=ok ;;
            124 | 137) status=TIMEOUT ;;
            *) status=FAIL ;;
        esac
        tail -n 25 "$STATE/logs/$step.log"
        echo "$status $(($(now) - t0)) rc=$rc" >"$STATE/status.$step"
        log "=== $step: $status in $(($(now) - t0)) s"
    done
    rm -f "$STATE/current"
    touch "$STATE/worker_done"
}

summary() {
    echo
    # the copied tree's .git (if any) is the device tool's, not this commit's: prefer the sha
    # the caller passed
    local sha="${ECHOFAST_GIT_SHA:-$(cd "$REPO" && git describe --always --dirty 2>/dev/null)}"
    echo "echofast GPU session: card $(cat "$STATE/slug" 2>/dev/null || echo '?'), git ${sha:-?}"
    printf '%-14s %-9s %8s  %s\n' step status seconds note
    local step status secs note
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
    local slug csv
    slug="$(cat "$STATE/slug" 2>/dev/null)"
    [[ -n "$slug" ]] || return 0
    echo
    echo "CSV files for this card:"
    ls -l "$REPO"/bench/results/*_"$slug".csv "$REPO"/bench/results/*_"$slug".partial.csv \
        2>/dev/null | awk '{print "  " $NF, $5 " bytes"}'
    for csv in "$REPO/bench/results/echofast_bench_$slug.csv" \
        "$REPO/bench/results/echofast_bench_$slug.partial.csv"; do
        if [[ -f "$csv" && -z "$DRY" ]]; then
            echo
            echo "echofast bench --report $(basename "$csv"):"
            (cd /tmp && echofast bench --report "$csv") 2>&1 | cut -c1-160
            echo
            echo "what the speed goals demand (bench/goal_bounds.py):"
            python "$REPO/bench/goal_bounds.py" "$csv" --git "$sha" 2>&1 | cut -c1-220
        fi
    done
}

collect() {
    # what comes back: at most 8 files, so one archive + the log + the summary
    local out="${OUT:-$STATE/out}"
    mkdir -p "$out"
    summary >"$out/gpu_session_summary.txt"
    cp "$STATE/worker.log" "$out/gpu_session.log" 2>/dev/null
    local slug files=()
    slug="$(cat "$STATE/slug" 2>/dev/null)"
    if [[ -n "$slug" ]]; then
        mapfile -t files < <(cd "$REPO" &&
            ls bench/results/*_"$slug".csv bench/results/*_"$slug".partial.csv 2>/dev/null)
    fi
    local tuned=()
    [[ -f "$STATE/tuned/kernels/geglu_linear_tuned.json" ]] &&
        tuned=(-C "$STATE/tuned" kernels/geglu_linear_tuned.json) # as geglu_tune wrote it
    (cd "$REPO" && tar -czf "$out/gpu_session_results.tar.gz" "${files[@]}" \
        -C "$STATE" logs "${tuned[@]}" 2>/dev/null)
}

attach() {
    local t0 watched=1 shown=0 lines
    t0="$(now)"
    mkdir -p "$STATE/logs"
    if [[ -f "$STATE/pid" ]] && kill -0 "$(cat "$STATE/pid")" 2>/dev/null; then
        log "attaching to the running worker (pid $(cat "$STATE/pid"))"
    elif all_final; then
        log "every step has run on this machine"
        watched=0
    else
        log "starting a worker (log: $STATE/worker.log); it starts no step after" \
            "$WAIT_S s from now"
        rm -f "$STATE/worker_done"
        [[ -f "$STATE/worker.log" ]] && shown="$(wc -l <"$STATE/worker.log")" # earlier calls'
        setsid nohup bash "$SELF" --worker "$((t0 + WAIT_S))" >>"$STATE/worker.log" 2>&1 \
            </dev/null &
        echo $! >"$STATE/pid"
    fi
    show_new() {
        lines="$(wc -l <"$STATE/worker.log")"
        if ((lines > shown)); then
            sed -n "$((shown + 1)),${lines}p" "$STATE/worker.log"
            shown="$lines"
        fi
    }
    while ! all_final && [[ ! -f "$STATE/worker_done" ]] && (($(now) - t0 < WAIT_S + 30)); do
        kill -0 "$(cat "$STATE/pid")" 2>/dev/null || break
        sleep "$POLL_S"
        show_new
    done
    # what the worker wrote between the last look and its final status (none to show when no
    # worker ran in this call)
    [[ -f "$STATE/pid" ]] && ((watched)) && show_new
    collect
    cat "${OUT:-$STATE/out}/gpu_session_summary.txt"
    if all_final; then
        echo "DONE: results in \$OUT/gpu_session_results.tar.gz"
    elif kill -0 "$(cat "$STATE/pid")" 2>/dev/null; then
        echo "RUNNING: the worker is still in a step; call the same command again now"
    else
        echo "MORE: steps are left (not-run/pending above); if the lease has time left, call the"
        echo "same command again now (GPU_SESSION_STEPS=... to choose), else leave them for a later"
        echo "session"
    fi
}

plan() {
    echo "gpu_session.sh plan: steps in order, time cap each (s); a call starts no step after"
    echo "GPU_SESSION_WAIT_S=$WAIT_S s and shortens the last one's cap to what is left"
    local step total=0
    for step in "${STEPS[@]}"; do
        printf '  %-14s %5s\n' "$step" "${CAP[$step]}"
        total=$((total + CAP[$step]))
    done
    printf '  %-14s %5s\n' "(sum of caps)" "$total"
    echo "tests_gpu: pytest -m gpu --ignore=tests/triton tests, then tests/test_extension.py:"
    (cd "$REPO" && "$PY" -m pytest -q --co -m gpu --ignore=tests/triton tests 2>&1 | tail -n 2)
}

case "${1:-}" in
    --fetch-wheels) fetch_wheels ;;
    --plan) plan ;;
    --worker) mkdir -p "$STATE/logs" && worker "$2" ;;
    --step)
        cd "$REPO" || exit 1
        SLUG="${SLUG:-$(cat "$STATE/slug")}"
        "step_$2"
        ;;
    "") attach ;;
    *)
        sed -n '2,/^set -uo/p' "$SELF" | sed '$d'
        exit 2
        ;;
esac
