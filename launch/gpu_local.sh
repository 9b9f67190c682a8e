#!/usr/bin/env bash
# usage: launch/gpu_local.sh [--processes=N] [options] -- PROGRAM_FLAGS...
#
# Runs valign_jax on one machine with several GPUs. The JAX way is one process that sees every
# local GPU: that is the default, and the mesh spans all of them. --processes=N starts N local
# processes instead, each with its own share of the GPUs (CUDA_VISIBLE_DEVICES split into N
# equal groups) and VALIGN_COORDINATOR_ADDRESS=127.0.0.1:PORT, VALIGN_NUM_PROCESSES=N,
# VALIGN_PROCESS_ID=i, so they form one jax job exactly as the hosts of a cluster do: a
# rehearsal of a multi-host run on one machine. With no GPUs the processes share the CPU.
# If one process fails, the others are stopped; the exit status is the first failure's.
#
# options:
#   --processes=N         local processes (default 1)
#   --gpus=LIST           GPU indices to use, e.g. 0,1,2,3 (default: CUDA_VISIBLE_DEVICES,
#                         else every GPU nvidia-smi lists)
#   --port=PORT           the coordinator's port on 127.0.0.1 (default 12357)
#   --python=PYTHON       interpreter with valign_jax installed (default: python)
#   --module=MODULE       the program (default: valign_jax.main)
#   --dry-run             print the command(s) ("[dry-run] " + the command), run nothing
#   -h, --help            this text
#
# examples:
#   launch/gpu_local.sh -- --config=configs/clip.py --workdir=/tmp/clip
#   launch/gpu_local.sh --processes=2 -- --config=configs/clip.py:demo --workdir=/tmp/clip_2proc

set -euo pipefail

launch_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$launch_dir/common.sh"

processes=1 gpus="" port=12357 python="python" module="valign_jax.main"
program_args=()
while (($#)); do
  case "$1" in
    --processes | --processes=*) processes="$(flag_value "$1")" ;;
    --gpus | --gpus=*) gpus="$(flag_value "$1")" ;;
    --port | --port=*) port="$(flag_value "$1")" ;;
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
[[ "$processes" =~ ^[1-9][0-9]*$ ]] ||
  die_usage "--processes=$processes: expected a positive integer"
[[ "$port" =~ ^[0-9]+$ ]] || die_usage "--port=$port: expected a port number"
program=("$python" -m "$module" "${program_args[@]}")

if ((processes == 1)); then
  run "${program[@]}"
  exit
fi

if [[ -z "$gpus" ]]; then
  gpus="${CUDA_VISIBLE_DEVICES:-}"
  if [[ -z "$gpus" ]] && command -v nvidia-smi >/dev/null; then
    gpus="$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)"
  fi
fi
[[ -z "$gpus" || "$gpus" =~ ^[A-Za-z0-9:-]+(,[A-Za-z0-9:-]+)*$ ]] ||
  die_usage "GPUs '$gpus' (from --gpus or CUDA_VISIBLE_DEVICES): expected a list like 0,1,2,3"
IFS=, read -r -a gpu_list <<<"$gpus"
per_process=$((${#gpu_list[@]} / processes))
if ((${#gpu_list[@]} == 0)); then
  note "no GPUs found: the $processes processes share the CPU"
elif ((${#gpu_list[@]} % processes)); then
  die_usage "--processes=$processes does not divide the ${#gpu_list[@]} GPUs ($gpus); choose a \
divisor or pass --gpus=..."
fi

# env_command: the environment of process $1: the coordinator's address, the job's size, its
# rank, its GPUs. JAX_LOCAL_DEVICE_IDS keeps all of them in use where jax would otherwise guess
# one GPU per process (inside a SLURM allocation, see gpu_slurm.sh).
set_env_command() {
  local rank="$1"
  env_command=(env VALIGN_COORDINATOR_ADDRESS="127.0.0.1:$port" VALIGN_NUM_PROCESSES="$processes"
    VALIGN_PROCESS_ID="$rank")
  if ((per_process)); then
    local mine=("${gpu_list[@]:rank*per_process:per_process}")
    env_command+=(CUDA_VISIBLE_DEVICES="$(IFS=,; echo "${mine[*]}")"
      JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((per_process - 1)))")
  fi
}

if ((DRY_RUN)); then
  for ((rank = 0; rank < processes; rank++)); do
    set_env_command "$rank"
    run "${env_command[@]}" "${program[@]}"
  done
  exit
fi

pids=()
stop_all() { kill "${pids[@]}" 2>/dev/null || true; }
trap stop_all INT TERM
for ((rank = 0; rank < processes; rank++)); do
  set_env_command "$rank"
  note "process $rank: $(shell_words "${env_command[@]}" "${program[@]}")"
  "${env_command[@]}" "${program[@]}" &
  pids+=("$!")
done
# A process that fails leaves the others waiting for it at the next collective: stop them.
status=0
for ((finished = 0; finished < processes; finished++)); do
  wait -n || {
    status=$?
    note "a process failed (exit status $status): stopping the others"
    stop_all
    break
  }
done
wait || true
exit "$status"
