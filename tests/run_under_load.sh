#!/usr/bin/env bash
# The test suite on a machine whose every core is busy: starts one spinning process per core (a CPU hog),
# runs pytest RUNS times (default 3) under it, stops the hog, and prints each run's result and time.
# Timing tests must hold here, as they must on a shared CI machine. Extra arguments go to pytest.
#   make test-under-load RUNS=3        bash tests/run_under_load.sh tests/test_comm.py
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
python=${PYTHON:-python3}

hogs=()
stop_hogs() { [ ${#hogs[@]} -gt 0 ] && kill "${hogs[@]}" 2>/dev/null; wait 2>/dev/null; }
trap stop_hogs EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
for _ in $(seq "$(nproc)"); do
    "$python" -c "while True: pass" &
    hogs+=($!)
done
echo "under load: ${#hogs[@]} CPU hogs on $(nproc) cores; $runs runs"

failed=0
log=$(mktemp)
for run in $(seq "$runs"); do
    start=$(date +%s)
    "$python" -m pytest -q -p no:cacheprovider "$@" > "$log" 2>&1
    status=$?
    summary=$(grep -E "passed|failed|error" "$log" | tail -1)
    echo "run $run/$runs: exit $status in $(( $(date +%s) - start ))s: $summary"
    if [ "$status" -ne 0 ]; then
        failed=$((failed + 1))
        grep -E "^(FAILED|ERROR)" "$log"
        cp "$log" "${TMPDIR:-/tmp}/under_load_run$run.log" && echo "  log: ${TMPDIR:-/tmp}/under_load_run$run.log"
    fi
done
rm -f "$log"
echo "under load: $((runs - failed)) of $runs runs passed"
[ "$failed" -eq 0 ]
