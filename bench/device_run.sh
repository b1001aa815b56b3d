#!/usr/bin/env bash
# One step of a long bench/direct.py run on a machine lent for short commands (the device tool:
# 10 minutes a command, a fresh machine after each idle spell). Run from the repository root:
#
#   bench/device_run.sh NAME SPEC [direct.py options ...]     e.g.
#   bench/device_run.sh ipc10 search_spaces/reference/mnist_ipc10.yaml --set algorithms.mtt.iterations=2000
#
# It continues the trials in direct-runs/NAME (--resume: from their checkpoints; new ones start),
# stops after DEVICE_LIMIT_S seconds (default 480) with a checkpoint, and, when $OUT is set, packs
# direct-runs/NAME without its trajectory store into ONE file, $OUT/NAME.tar.gz (the curves, the
# sets and the checkpoints), beside $OUT/NAME.json (direct.json: the table, readable at once).
# One file because the device tool brings back at most 8 files and none more than 2 folders below
# $OUT, and a run's checkpoints lie 3 below it. Unpack it here, where the next call will carry it:
#
#   mkdir -p direct-runs/NAME && tar -C direct-runs/NAME -xzf FILES_AT/NAME.tar.gz
#
# and name direct-runs in the next call's `carry`. The next machine retrains the experts (with the
# spec's seeds; on a GPU not bit for bit, so a trial resumed there reads slightly other
# trajectories than before). Run it again until every trial reports all its iterations.
# Data: the ../shared beside a checkout does not travel; copy what the spec reads into a folder
# git ignores (e.g. devdata/mnist), carry it, and export ORCHESTRATE_DATA=$PWD/devdata (done here
# when devdata/ exists and ORCHESTRATE_DATA is unset).
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: bench/device_run.sh NAME SPEC [direct.py options ...]" >&2
    exit 2
fi
name=$1
shift
case "$name" in
    */* | .* | "") echo "bench/device_run.sh: NAME '$name' must be a plain folder name" >&2; exit 2 ;;
esac
if [ -z "${ORCHESTRATE_DATA:-}" ] && [ -d devdata ]; then
    export ORCHESTRATE_DATA="$PWD/devdata"
fi
out="direct-runs/$name"
mkdir -p "$out"
status=0
# python3: on the lent machine a plain `python3` is the one that holds PyTorch (PYTHON overrides it)
"${PYTHON:-python3}" bench/direct.py "$@" --out "$out" --resume --time-limit "${DEVICE_LIMIT_S:-480}" \
    --json "$out/direct.json" || status=$?
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    tar -C "$out" --exclude=./trajectories -czf "$OUT/$name.tar.gz.part" . && mv "$OUT/$name.tar.gz.part" "$OUT/$name.tar.gz"
    if [ -f "$out/direct.json" ]; then cp "$out/direct.json" "$OUT/$name.json"; fi
    size=$(wc -c < "$OUT/$name.tar.gz")
    if [ "$size" -gt $((16 * 1024 * 1024)) ]; then
        echo "bench/device_run.sh: $OUT/$name.tar.gz is $size bytes, over the 16 MiB a file the device tool brings back" >&2
        if [ "$status" -eq 0 ]; then status=1; fi
    fi
    echo "bench/device_run.sh: packed $out into \$OUT/$name.tar.gz ($size bytes); unpack it with" \
         "mkdir -p $out && tar -C $out -xzf FILES_AT/$name.tar.gz"
fi
exit "$status"
