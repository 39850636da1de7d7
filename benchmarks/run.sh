#!/usr/bin/env bash
# One command for every benchmark: bash benchmarks/run.sh [--repeat N] [--seconds N] [--events N] ...
# Needs the local stack (bash deploy/local/up.sh or services.sh). Installs its tools on first use,
# runs within its time budget on an isolated database and topic prefix, then writes
# benchmarks/RESULTS.md and benchmarks/results.png. Figures and logs: benchmarks/out/.
SERVICE=bench
. "$(dirname "$0")/../deploy/local/common.sh"
cd "$ROOT"
# --scale-out (first): 1 broker against 3, processors 1 -> 2 -> 4 (benchmarks/scale_out.py); needs no other tools
[ "${1:-}" = --scale-out ] && { shift; exec .venv/bin/python -m benchmarks.scale_out "$@"; }
# --side-by-side (first): another revision's gateway and processor against this checkout's in one run
# (benchmarks/side_by_side.py)
module=harness
[ "${1:-}" = --side-by-side ] && { shift; module=side_by_side; }
case " $* " in *" -h "*|*" --help "*) exec .venv/bin/python -m benchmarks.$module --help ;; esac

bash benchmarks/install.sh
# One run at a time: runs share benchmarks/out and the machine, so a second run waits for the first.
exec 9>benchmarks/.venv/run.lock
if ! flock -n 9; then say "another benchmark run is going on; waiting for it to finish"; flock 9; fi
[ -x .venv/bin/python ] || die "the project's virtual environment is missing" "run bash deploy/local/up.sh first"
[ $module = side_by_side ] && exec .venv/bin/python -m benchmarks.side_by_side "$@"
rm -rf benchmarks/out && mkdir -p benchmarks/out
# The log-read part queries a database of 10 million log records: made on first use (minutes, with
# progress), reused afterwards, outside the run's time budget (benchmarks/logs_seed.py).
case " $* " in *" --only logs "*|*" --only=logs "*) .venv/bin/python -m benchmarks.logs_seed ;; esac
# The harness skips what would overrun its budget (--budget, 540 s a run); timeout is the last guard.
repeat=1
previous=""
for arg in "$@"; do
  [ "$previous" = --repeat ] && repeat=$arg
  case $arg in --repeat=*) repeat=${arg#--repeat=} ;; esac
  previous=$arg
done
timeout -s INT $((600 * repeat)) .venv/bin/python -m benchmarks.harness "$@"
benchmarks/.venv/bin/python -m benchmarks.chart benchmarks/out/results.json benchmarks/results.png
.venv/bin/python -m benchmarks.report benchmarks/out/results.json benchmarks/RESULTS.md "bash benchmarks/run.sh $*"
say "wrote benchmarks/RESULTS.md and benchmarks/results.png"
