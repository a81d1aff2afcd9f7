"""The pod and cluster scripts of `launch/`, checked by their dry runs
(DRY_RUN=1 prints the command each would run): the docs' exact commands
produce a `launch.train --multihost` command with every argument intact."""

import os
import shlex
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dry(script, *args, **env):
  out = subprocess.run([os.path.join(REPO, "launch", script), *args], cwd=REPO, text=True,
                       capture_output=True, timeout=60,
                       env={**os.environ, "DRY_RUN": "1", **env})
  return out.returncode, out.stdout, out.stderr


def test_tpu_pod_runs_one_command_on_every_worker():
  code, out, err = _dry("tpu_pod.sh", "my-tpu", "us-central2-b", "gs://bucket/runs/c10",
                        "--config", "configs/default.py:cifar10",
                        "--config.streams.train.batch_size=1024", "--config.note=two words",
                        REPO_URL="https://example.com/jaxrobust.git", REF="0123abc")
  assert code == 0, err
  first, *remote = out.strip().splitlines()
  assert shlex.split(first.split("<<")[0]) == [
      "gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone", "us-central2-b",
      "--worker=all", "--command"]
  assert remote[-1] == "EOF"
  assert "git clone https://example.com/jaxrobust.git jaxrobust" in remote[1]
  assert "git checkout -q 0123abc" in remote[2]
  assert "'jax[tpu]'" in remote[4]
  assert shlex.split(remote[5]) == [
      "python", "-m", "launch.train", "--multihost", "--workdir", "gs://bucket/runs/c10",
      "--config", "configs/default.py:cifar10", "--config.streams.train.batch_size=1024",
      "--config.note=two words"]


def test_tpu_pod_needs_its_three_arguments_and_a_repository():
  code, _, err = _dry("tpu_pod.sh", "my-tpu")
  assert code == 2 and err.startswith("usage:")
  code, _, err = _dry("tpu_pod.sh", "t", "z", "gs://b/r", REPO_URL="", GIT_DIR="/nonexistent")
  assert code == 2 and "REPO_URL" in err


def test_gpu_multinode_by_hand_passes_the_coordinator_flags():
  code, out, err = _dry("gpu_multinode.sh", "/shared/runs/exp", "--config",
                        "configs/default.py:cifar10", COORDINATOR="10.0.0.1:1234",
                        NUM_PROCESSES="2", PROCESS_ID="1")
  assert code == 0, err
  assert shlex.split(out) == [
      "python", "-m", "launch.train", "--multihost", "--coordinator_address=10.0.0.1:1234",
      "--num_processes=2", "--process_id=1", "--workdir", "/shared/runs/exp", "--config",
      "configs/default.py:cifar10"]


def test_gpu_multinode_under_a_scheduler_lets_jax_detect_the_cluster():
  code, out, err = _dry("gpu_multinode.sh", "/shared/runs/exp")
  assert code == 0, err
  assert shlex.split(out) == ["python", "-m", "launch.train", "--multihost", "--workdir",
                              "/shared/runs/exp"]
  code, _, err = _dry("gpu_multinode.sh", "/r", COORDINATOR="h:1", NUM_PROCESSES="2")
  assert code != 0 and "PROCESS_ID" in err


@pytest.mark.parametrize("submit_dir", [None, REPO])
def test_slurm_batch_script_sruns_one_process_per_node(submit_dir, tmp_path):
  env = {}
  script = "slurm.sbatch"
  if submit_dir:  # sbatch runs a copy of the script from its spool directory
    copy = tmp_path / "slurm_script"
    copy.write_text(open(os.path.join(REPO, "launch", script)).read())
    copy.chmod(0o755)
    script, env = str(copy), {"SLURM_SUBMIT_DIR": submit_dir}
  code, out, err = _dry(script, "/shared/runs/exp", "--config", "configs/default.py:cifar10", **env)
  assert code == 0, err
  assert shlex.split(out) == ["srun", "--kill-on-bad-exit=1",
                              os.path.join(REPO, "launch", "gpu_multinode.sh"), "/shared/runs/exp",
                              "--config", "configs/default.py:cifar10"]
  header = open(os.path.join(REPO, "launch", "slurm.sbatch")).read()
  assert "#SBATCH --ntasks-per-node=1" in header and "#SBATCH --signal=TERM@" in header
