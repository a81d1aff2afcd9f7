#!/usr/bin/env bash
# Run jaxrobust on several GPU hosts, one process per host (all its GPUs).
#
# By hand, on each host (PROCESS_ID 0 .. NUM_PROCESSES-1, the same COORDINATOR,
# the host:port of process 0):
#   COORDINATOR=10.0.0.1:1234 NUM_PROCESSES=2 PROCESS_ID=0 \
#     launch/gpu_multinode.sh /shared/runs/exp --config configs/default.py:cifar10
# Under Slurm (launch/slurm.sbatch) or Open MPI, leave COORDINATOR unset:
# jax.distributed.initialize() reads the job's environment itself.
# On ONE host with several GPUs no launcher is needed:
#   python -m launch.train --workdir /runs/exp --config configs/default.py:cifar10
#
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 WORKDIR [launch.train flags...]" >&2
  exit 2
fi
WORKDIR=$1; shift
DIST=()
if [ -n "${COORDINATOR:-}" ]; then
  DIST=(--coordinator_address="$COORDINATOR" --num_processes="${NUM_PROCESSES:?set NUM_PROCESSES}"
        --process_id="${PROCESS_ID:?set PROCESS_ID}")
fi
CMD=(python -m launch.train --multihost "${DIST[@]}" --workdir "$WORKDIR" "$@")
if [ -n "${DRY_RUN:-}" ]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
