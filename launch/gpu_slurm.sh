#!/usr/bin/env bash
# usage: launch/gpu_slurm.sh [options] -- PROGRAM_FLAGS...          (submits itself with sbatch)
#        sbatch [sbatch options] launch/gpu_slurm.sh -- PROGRAM_FLAGS...
#
# Runs valign_jax on a SLURM GPU cluster: one process per node (`srun`, one task per node),
# each driving all of its node's GPUs, all processes forming one jax job. Submit from the
# repository root (configs/ paths are relative to it); the workdir (--workdir=... after --)
# must be on a filesystem every node sees. Run from a login node, the script submits itself
# with sbatch; inside a job (sbatch, or an salloc shell) it starts the processes with srun.
#
# How the processes find each other: VALIGN_MULTIHOST=1, so jax.distributed.initialize() reads
# SLURM's own variables (coordinator: the first node of the step, port from the job id;
# SLURM_NTASKS processes; this one is SLURM_PROCID). Deriving VALIGN_COORDINATOR_ADDRESS etc.
# from `scontrol show hostnames` would repeat what jax already does. Either way jax's SLURM
# detection assumes one process per GPU and would bind each process to GPU SLURM_LOCALID only
# (github.com/jax-ml/jax/issues/16788), so JAX_LOCAL_DEVICE_IDS=0,...,G-1 hands each process
# all G GPUs of its node.
#
# options (also #SBATCH defaults below; flags win):
#   --nodes=N             nodes, one process each (default 2)
#   --gpus-per-node=G     GPUs per node (default 8)
#   --cpus-per-task=C     CPUs per process, for the input pipeline (default 16)
#   --partition=P, --time=HH:MM:SS, --account=A    passed to sbatch
#   --python=PYTHON       interpreter with valign_jax installed (default: python)
#   --module=MODULE       the program (default: valign_jax.main)
#   --dry-run             print the sbatch command and the srun command the job runs
#                         ("[dry-run] " + the command), run nothing
#   -h, --help            this text
#
# example:
#   launch/gpu_slurm.sh --nodes=4 --partition=gpu -- --config=configs/clip.py \
#     --workdir=/shared/runs/clip

#SBATCH --job-name=valign_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail

# sbatch runs a copy of this script from its spool directory; common.sh is then found in the
# repository the job runs in (sbatch's working directory).
launch_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ -f "$launch_dir/common.sh" ]] || launch_dir="$PWD/launch"
if [[ ! -f "$launch_dir/common.sh" ]]; then
  echo "gpu_slurm.sh: $launch_dir/common.sh not found: submit from the repository root" >&2
  exit 1
fi
# shellcheck source=common.sh
source "$launch_dir/common.sh"

nodes="" gpus_per_node="" cpus_per_task="" python="python" module="valign_jax.main"
sbatch_extra=()
program_args=()
while (($#)); do
  case "$1" in
    --nodes | --nodes=*) nodes="$(flag_value "$1")" ;;
    --gpus-per-node | --gpus-per-node=*) gpus_per_node="$(flag_value "$1")" ;;
    --cpus-per-task | --cpus-per-task=*) cpus_per_task="$(flag_value "$1")" ;;
    --partition | --partition=* | --time | --time=* | --account | --account=*)
      flag_value "$1" >/dev/null && sbatch_extra+=("$1") ;;
    --python | --python=*) python="$(flag_value "$1")" ;;
    --module | --module=*) module="$(flag_value "$1")" ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; program_args=("$@"); break ;;
    *) die_usage "unknown flag $1 (the program's own flags go after --)" ;;
  esac
  shift
done
require_program_args "${program_args[@]}"
for pair in "--nodes=$nodes" "--gpus-per-node=$gpus_per_node" "--cpus-per-task=$cpus_per_task"; do
  [[ "${pair#*=}" =~ ^([1-9][0-9]*)?$ ]] || die_usage "$pair: expected a positive integer"
done

# The job step: one task per node, each with all of the node's GPUs.
start_processes() {
  local nodes="$1" gpus="$2" cpus="$3" device_ids
  device_ids="$(seq -s, 0 $((gpus - 1)))"
  local srun_flags=(--nodes="$nodes" --ntasks-per-node=1 --gpus-per-node="$gpus"
    --kill-on-bad-exit=1)
  [[ -n "$cpus" ]] && srun_flags+=(--cpus-per-task="$cpus")
  run env VALIGN_MULTIHOST=1 JAX_LOCAL_DEVICE_IDS="$device_ids" \
    srun "${srun_flags[@]}" "$python" -m "$module" "${program_args[@]}"
}

if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  # Inside the job: the allocation says how many nodes and GPUs there are. (srun no longer
  # inherits --cpus-per-task from sbatch, hence SLURM_CPUS_PER_TASK passed on explicitly.)
  gpus="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}"
  gpus="${gpus##*:}"  # SLURM_GPUS_PER_NODE may read "a100:8"
  [[ "$gpus" =~ ^[1-9][0-9]*$ ]] ||
    die "job $SLURM_JOB_ID has no GPUs per node (SLURM_GPUS_ON_NODE is unset): submit with \
--gpus-per-node=G"
  start_processes "${SLURM_NNODES:?}" "$gpus" "${cpus_per_task:-${SLURM_CPUS_PER_TASK:-}}"
  exit
fi

# On a login node: submit this script; flags given here override its #SBATCH lines.
nodes="${nodes:-2}" gpus_per_node="${gpus_per_node:-8}" cpus_per_task="${cpus_per_task:-16}"
repo_root="$(dirname "$launch_dir")"
run sbatch --nodes="$nodes" --ntasks-per-node=1 --gpus-per-node="$gpus_per_node" \
  --cpus-per-task="$cpus_per_task" "${sbatch_extra[@]}" --chdir="$repo_root" \
  "$launch_dir/gpu_slurm.sh" --python="$python" --module="$module" -- "${program_args[@]}"
if ((DRY_RUN)); then
  note "dry run: inside the job, the script then runs:"
  start_processes "$nodes" "$gpus_per_node" "$cpus_per_task"
fi
