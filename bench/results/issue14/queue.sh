#!/bin/bash
# Runs each line of $1 (bench.train arguments) in turn; every finished run is appended
# to $2 (JSON lines), so re-running the queue skips what is done.
cd /work/wt14
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1
while read -r args; do
  [ -z "$args" ] && continue
  case "$args" in \#*) continue;; esac
  echo "== $(date -u +%H:%M:%S) $args"
  nice -n 5 /work/main/.venv/bin/python -c "import torch; torch.set_num_threads(1); import sys; from bench.train import main; main(sys.argv[1:])" \
    --json --plot '' --runs-file "$2" $args > /dev/null 2>> "$2.err" || echo "FAILED: $args"
  echo "== $(date -u +%H:%M:%S) done"
done < "$1"
