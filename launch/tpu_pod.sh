#!/usr/bin/env bash
# usage: launch/tpu_pod.sh --name=NAME --zone=ZONE --accelerator=TYPE [options] -- PROGRAM_FLAGS...
#
# Runs valign_jax on a Cloud TPU VM slice (one host or a pod slice of many): creates the TPU
# (or reuses it when `gcloud compute tpus tpu-vm describe` finds it), installs this package on
# every worker, and starts the same `python3 -m valign_jax.main PROGRAM_FLAGS` on all of them
# with VALIGN_MULTIHOST=1 (valign_jax.sharding.initialize_distributed() then calls
# jax.distributed.initialize(), which finds the other workers from the TPU metadata).
#
# required:
#   --name=NAME           TPU name (lowercase letters, digits, hyphens)
#   --zone=ZONE           e.g. us-central2-b
#   --accelerator=TYPE    e.g. v4-32, v5litepod-16, v5p-16, v6e-16
# options:
#   --project=PROJECT     gcloud project (default: gcloud's configured project)
#   --version=RUNTIME     TPU software version (default by family: v2-v4 tpu-ubuntu2204-base,
#                         v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
#   --spot                a Spot TPU (cheaper, can be preempted; rerun the same command to
#                         resume: the same flags give the same run name, so the same workdir)
#   --queued              request it with `gcloud compute tpus queued-resources create` and wait
#                         until it is ACTIVE, instead of `tpu-vm create`
#   --bucket=gs://BUCKET  workdir gs://BUCKET/NAME/RUN (unless PROGRAM_FLAGS give --workdir) and
#                         each worker's log copied to gs://BUCKET/NAME/RUN/logs/HOSTNAME.log;
#                         without it the workdir is ~/valign_runs/NAME/RUN on each worker's disk
#   --run=RUN             run name (default: derived from the program and its flags,
#                         <recipe>_<argument>-<checksum>, e.g. lilt_lilt_lwa-1a2b3c4d for
#                         --config=configs/lilt.py:lilt_lwa: the same command resumes the same
#                         workdir, other flags start another run); the same --run resumes
#   --repo=GIT_URL        install from this repository (default: copy this checkout, including
#                         uncommitted files; .git, workdirs and caches are left out)
#   --ref=REF             the branch, tag or commit of --repo to install
#   --module=MODULE       the program (default: valign_jax.main)
#   --dry-run             print every command ("[dry-run] " + the command), run nothing
#   -h, --help            this text
#
# example:
#   launch/tpu_pod.sh --name=lilt-pod --zone=us-central2-b --accelerator=v4-32 \
#     --bucket=gs://my-bucket -- --config=configs/lilt.py:lilt_lwa

set -euo pipefail

launch_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(dirname "$launch_dir")"
# shellcheck source=common.sh
source "$launch_dir/common.sh"

# The software version Google documents for each TPU family (cloud.google.com/tpu/docs/runtimes).
default_runtime_version() {
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

# The run name when --run is not given: the same for the same command, so a rerun after a
# preemption resumes its workdir. <recipe>_<argument> as valign_jax.main names its default
# workdir (from --config=configs/<recipe>.py:<argument>), then a checksum of the module and
# every program flag, so a command with other flags (another learning rate) is another run.
default_run_name() {
  local module="$1" config="" arg
  shift
  for arg in "$@"; do
    [[ "$arg" == --config=* ]] && config="${arg#--config=}"
  done
  local path="${config%%:*}" argument="" stem name checksum
  [[ "$config" == *:* ]] && argument="${config#*:}"
  stem="$(basename "${path:-run}")"
  name="${stem%.py}"
  [[ -n "$argument" ]] && name+="_${argument//,/_}"
  name="$(printf '%s' "$name" | tr -c 'A-Za-z0-9._-' '_')"
  checksum="$(printf '%s\0' "$module" "$@" | cksum)"
  printf '%s-%08x\n' "$name" "${checksum%% *}"
}

name="" zone="" accelerator="" project="" version="" bucket="" run_name="" repo="" ref=""
module="valign_jax.main" spot=0 queued=0
program_args=()
while (($#)); do
  case "$1" in
    --name | --name=*) name="$(flag_value "$1")" ;;
    --zone | --zone=*) zone="$(flag_value "$1")" ;;
    --accelerator | --accelerator=*) accelerator="$(flag_value "$1")" ;;
    --project | --project=*) project="$(flag_value "$1")" ;;
    --version | --version=*) version="$(flag_value "$1")" ;;
    --bucket | --bucket=*) bucket="$(flag_value "$1")" ;;
    --run | --run=*) run_name="$(flag_value "$1")" ;;
    --repo | --repo=*) repo="$(flag_value "$1")" ;;
    --ref | --ref=*) ref="$(flag_value "$1")" ;;
    --module | --module=*) module="$(flag_value "$1")" ;;
    --spot) spot=1 ;;
    --queued) queued=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; program_args=("$@"); break ;;
    *) die_usage "unknown flag $1 (the program's own flags go after --)" ;;
  esac
  shift
done

require_flag --name "$name"
require_flag --zone "$zone"
require_flag --accelerator "$accelerator"
require_program_args "${program_args[@]}"
# GCP takes lowercase names only; a dry run still prints the commands (placeholders like N).
if [[ ! "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]]; then
  if ((DRY_RUN)); then
    note "--name=$name: gcloud wants lowercase letters, digits and hyphens"
  else
    die_usage "--name=$name: use lowercase letters, digits and hyphens, starting with a letter"
  fi
fi
if [[ -z "$version" ]]; then
  version="$(default_runtime_version "$accelerator")" ||
    die_usage "--accelerator=$accelerator: no default TPU software version; pass --version=..."
fi
if [[ -n "$bucket" ]]; then
  [[ "$bucket" == gs://?* ]] || die_usage "--bucket=$bucket must look like gs://BUCKET"
  bucket="${bucket%/}"
fi
[[ -z "$ref" || -n "$repo" ]] || die_usage "--ref=$ref needs --repo=GIT_URL"
if [[ -z "$run_name" ]]; then
  run_name="$(default_run_name "$module" "${program_args[@]}")"
  note "run name $run_name (from the program's flags: rerunning this command resumes it; \
--run=NAME chooses another)"
fi
[[ "$run_name" =~ ^[A-Za-z0-9._-]+$ ]] ||
  die_usage "--run=$run_name: use letters, digits, '.', '_', '-'"

# Flags every gcloud TPU command takes.
scope=(--zone="$zone")
[[ -n "$project" ]] && scope+=(--project="$project")
tpu=(gcloud compute tpus tpu-vm)
queued_resources=(gcloud compute tpus queued-resources)
on_all_workers=("${tpu[@]}" ssh "$name" "${scope[@]}" --worker=all --command)

create_tpu() {
  local spot_flag=()
  ((spot)) && spot_flag=(--spot)
  if probe "${tpu[@]}" describe "$name" "${scope[@]}"; then
    note "TPU $name exists in $zone: reusing it"
    return
  fi
  if ((DRY_RUN)); then
    note "dry run: assuming $name does not exist yet (when describe finds it, creating is skipped)"
  fi
  if ((!queued)); then
    run "${tpu[@]}" create "$name" "${scope[@]}" --accelerator-type="$accelerator" \
      --version="$version" "${spot_flag[@]}"
    return
  fi
  if ! probe "${queued_resources[@]}" describe "$name" "${scope[@]}"; then
    run "${queued_resources[@]}" create "$name" --node-id="$name" "${scope[@]}" \
      --accelerator-type="$accelerator" --runtime-version="$version" "${spot_flag[@]}"
  fi
  wait_until_active
}

# A queued resource waits for capacity (minutes to days); poll its state until the TPU is there.
wait_until_active() {
  local describe=("${queued_resources[@]}" describe "$name" "${scope[@]}")
  local state_query=("${describe[@]}" --format="value(state.state)")
  if ((DRY_RUN)); then
    run "${state_query[@]}"
    note "dry run: the command above is polled every 60 s until it says ACTIVE"
    return
  fi
  local state
  while true; do
    state="$("${state_query[@]}")"
    case "$state" in
      ACTIVE) return ;;
      FAILED | SUSPENDING | SUSPENDED | DELETING)
        die "queued resource $name is $state; see: $(shell_words "${describe[@]}")" ;;
      *) note "queued resource $name is $state; checking again in 60 s" && sleep 60 ;;
    esac
  done
}

# The code goes to ~/valign_jax on every worker, replaced on each launch; pip installs it
# editable with the TPU build of jax.
install_package() {
  local pip_install fetch
  pip_install="cd valign_jax && $(shell_words python3 -m pip install --quiet -e ".[tpu,gcs]")"
  if [[ -n "$repo" ]]; then
    fetch="rm -rf valign_jax && $(shell_words git clone --quiet "$repo" valign_jax)"
    [[ -n "$ref" ]] && fetch+=" && $(shell_words git -C valign_jax checkout --quiet "$ref")"
    run "${on_all_workers[@]}" "$fetch && $pip_install"
    return
  fi
  local archive="${TMPDIR:-/tmp}/valign_jax-$name-$run_name.tgz"
  run tar -czf "$archive" -C "$repo_root" --exclude=.git --exclude=workdirs --exclude=__pycache__ \
    --exclude='*.egg-info' --exclude=.pytest_cache .
  run "${tpu[@]}" scp "$archive" "$name:valign_jax.tgz" "${scope[@]}" --worker=all
  run "${on_all_workers[@]}" \
    "rm -rf valign_jax && mkdir valign_jax && tar -xzf valign_jax.tgz -C valign_jax && $pip_install"
  run rm -f "$archive"
}

# One command on every worker: the program with VALIGN_MULTIHOST=1, its output teed to
# ~/valign_logs/NAME/RUN/HOSTNAME.log, which is copied to the bucket when the program ends (also
# when it fails); the exit status is the program's. NAME and RUN need no quoting (checked above).
start_program() {
  local workdir="../valign_runs/$name/$run_name" arg
  [[ -n "$bucket" ]] && workdir="$bucket/$name/$run_name"
  for arg in "${program_args[@]}"; do
    [[ "$arg" == --workdir || "$arg" == --workdir=* ]] && workdir=""
  done
  local args=("${program_args[@]}")
  [[ -n "$workdir" ]] && args=(--workdir="$workdir" "${args[@]}")
  local log="../valign_logs/$name/$run_name/\"\$(hostname)\".log" copy_log=""
  if [[ -n "$bucket" ]]; then
    copy_log="gcloud storage cp $log $(shell_words "$bucket/$name/$run_name/logs/"); "
  fi
  run "${on_all_workers[@]}" "mkdir -p valign_logs/$name/$run_name && cd valign_jax && \
export VALIGN_MULTIHOST=1 && set -o pipefail && \
$(shell_words python3 -m "$module" "${args[@]}") 2>&1 | tee $log; \
status=\$?; ${copy_log}exit \$status"
}

if [[ -z "$bucket" ]]; then
  note "no --bucket: the workdir and logs stay on each worker's disk (~/valign_runs, ~/valign_logs)"
fi
create_tpu
install_package
start_program
