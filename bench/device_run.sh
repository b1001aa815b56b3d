#!/usr/bin/env bash
# One step of a long bench/direct.py run on a machine lent for short commands (the device tool:
# 10 minutes a command, a fresh machine after each idle spell). Run from the repository root:
#
#   bench/device_run.sh NAME SPEC [direct.py options ...]     e.g.
#   bench/device_run.sh ipc10 search_spaces/reference/mnist_ipc10.yaml --set algorithms.mtt.iterations=2000
#
# It continues the trials in direct-runs/NAME (--resume: from their checkpoints; new ones start),
# stops after DEVICE_LIMIT_S seconds (default 480) with a checkpoint, and, when $OUT is set, copies
# direct-runs/NAME without its trajectory store to $OUT/NAME: the curves, the sets and the
# checkpoints that come back. Put them under direct-runs/NAME here and name direct-runs in the next
# call's `carry`; the next machine retrains the experts (with the spec's seeds; on a GPU not bit for
# bit, so a trial resumed there reads slightly other trajectories than before). Run it again until
# every trial reports all its iterations.
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
out="direct-runs/$name"
mkdir -p "$out"
status=0
python bench/direct.py "$@" --out "$out" --resume --time-limit "${DEVICE_LIMIT_S:-480}" \
    --json "$out/direct.json" || status=$?
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/$name"
    tar -C "$out" --exclude=./trajectories -cf - . | tar -C "$OUT/$name" -xf -
fi
exit "$status"
