#!/usr/bin/env bash
# The GPU figures of docs/performance.md (parts e and f of `fedsam bench`) in one call of the device tool.
#
#   python -m scripts.device_bundle                 # here, first: .devcarry/site.tar.xz, Flower and Ray (~4 min)
#   device run: bash scripts/device_bench.sh        # carry [".devcarry"], timeout_s 600
#
# The lent machine has torch but neither Flower nor Ray, and no network: the bundle brings them.
# Part e (the FL-Simulator round end to end through `fedsam run`, batched cohorts on and off) runs
# first, because nothing else measures it; part f (a round's client work in one process: the
# cohort-size sweep, the FL-Simulator round, an SSAM-F round) second. Each part has its own time
# limit and writes its own JSON and log under $OUT, so one that fails loses only itself.
# DEVICE=cpu runs the same on a machine without a GPU (part e is then skipped by the bench itself).
set -uo pipefail
out=${OUT:-/tmp/fedsam-device}
site=/tmp/fedsam-site
device=${DEVICE:-cuda}
mkdir -p "$out" "$site"
tar -xJf .devcarry/site.tar.xz -C "$site" || { echo "no bundle: run python -m scripts.device_bundle first"; exit 1; }
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    nproc
    python3 -c "import sys, torch, flwr, ray; print(sys.version.split()[0], 'torch', torch.__version__, 'flwr', flwr.__version__, 'ray', ray.__version__)"
} 2>&1 | tee "$out/machine.txt"

stop_ray() {  # a part stopped by its time limit leaves its fedsam run (a session of its own) and Ray behind
    pkill -9 -f "simulations run" 2>/dev/null
    pkill -9 -f "$site/ray/" 2>/dev/null
    pkill -9 -f "ray::" 2>/dev/null
    sleep 1
}

part() {  # part LETTER SECONDS [bench flags...]
    local letter=$1 limit=$2 skip
    shift 2
    skip=$(echo a b c d e f | tr ' ' '\n' | grep -vx "$letter" | paste -sd,)
    echo "== part $letter (at most $limit s)"
    timeout -k 10 "$limit" python3 -m simulations bench --device "$device" --skip "$skip" "$@" \
        --out "$out/bench-$letter.json" 2>&1 | tee "$out/bench-$letter.log"
    echo "== part $letter: exit ${PIPESTATUS[0]}"
    stop_ray
}

part e 270
part f 270 --repeats 2
ls -l "$out"
