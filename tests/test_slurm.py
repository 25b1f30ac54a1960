"""The sbatch scripts against a real Slurm cluster (slurm/local_cluster.sh: slurmctld and two
slurmd on this machine). Select with ``-m slurm``. Where no cluster can be started (not root, no
Slurm and no apt) the tests skip and say why; CI (.ci/run) starts the cluster, so they run there.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, losses_by_step, tiny_overrides

pytestmark = pytest.mark.slurm
CLUSTER = ROOT / "slurm" / "local_cluster.sh"
SBATCH = ROOT / "slurm" / "pretrain.sbatch"
DAEMONS = {"slurmctld", "slurmd", "slurmstepd", "munged"}
STEPS = 200  # ~30 ms each here: time to deliver the preemption signal mid-run


def _why_no_cluster() -> str | None:
    if sys.platform != "linux":
        return "Slurm integration tests need Linux"
    if os.geteuid() != 0:
        return "slurm/local_cluster.sh needs root to start slurmctld/slurmd (not root here)"
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    return None


@pytest.fixture(scope="module")
def cluster():
    """Start the local cluster unless one is up (CI starts it); stop it after if we started it."""
    reason = _why_no_cluster()
    if reason:
        pytest.skip(reason)
    was_up = subprocess.run([CLUSTER, "status"], capture_output=True).returncode == 0
    if not was_up:
        started = subprocess.run([CLUSTER, "start"], capture_output=True, text=True, timeout=600)
        assert started.returncode == 0, started.stdout + started.stderr
    yield
    if not was_up:
        subprocess.run([CLUSTER, "stop"], capture_output=True, timeout=200)  # waits for the daemons


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                         check=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def node_states() -> list[str]:
    """`sinfo`'s nodes and states, flat: ["pnode1", "idle", "pnode2", "idle"]."""
    return subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True,
                          timeout=30).stdout.split()


def submit(tmp_path: Path, name: str, overrides: list[str], sbatch_args: tuple[str, ...] = ()) -> str:
    env = {**os.environ, "PRETRAIN_PYTHON": sys.executable,
           "PRETRAIN_LOG_ROOT": str(tmp_path / "logs"), "WANDB_MODE": "offline"}
    args = [a for o in overrides for a in ("--set", o)]
    out = subprocess.run(
        ["sbatch", "--parsable", f"--job-name={name}", f"--output={tmp_path}/%x-%j.out", *sbatch_args,
         str(SBATCH), "--config", "configs/mistral_tiny.yaml", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def wait_for(job_id: str, *states: str, timeout: float = 300) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info["JobState"] in states:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout:.0f} s: {info}")


def logs(tmp_path: Path, name: str, job_id: str) -> tuple[str, str]:
    """(batch script output, the node logs concatenated)."""
    batch = (tmp_path / f"{name}-{job_id}.out").read_text()
    nodes = "".join(p.read_text() for p in sorted((tmp_path / "logs" / f"{name}-{job_id}").glob("node*.log")))
    return batch, nodes


@pytest.fixture(scope="module")
def uninterrupted(cluster, dataset, tmp_path_factory):
    """A 2-node x 1-task gloo job run to the end: (tmp dir, job id, losses by step)."""
    tmp = tmp_path_factory.mktemp("slurm_full")
    run_dir = tmp / "run"
    job = submit(tmp, "full", tiny_overrides(dataset, run_dir, **{"train.steps": STEPS}))
    info = wait_for(job, "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
    return tmp, job, info, losses_by_step(run_dir)


def test_two_node_job_completes_with_both_ranks_training(uninterrupted):
    tmp, job, info, losses = uninterrupted
    batch, nodes = logs(tmp, "full", job)
    assert info["JobState"] == "COMPLETED", batch + nodes[-3000:]
    assert info["NumNodes"] == "2" and info["NodeList"] == "pnode[1-2]"
    assert "2 node(s) x 1 process(es)" in batch
    assert sorted(losses) == list(range(1, STEPS + 1))
    for rank in (0, 1):  # each rank reports from its own node's log
        assert f"rank {rank}/2 on pnode" in nodes and f"finished at step {STEPS}" in nodes
    assert "on pnode1: finished" in nodes and "on pnode2: finished" in nodes


def preempt_until_requeued(job: str, run_dir: Path) -> None:
    """Once a few steps are logged, what --signal=B:USR1@N does at the time limit (SIGUSR1 to
    the batch script); returns when the job is pending again after its requeue."""
    deadline = time.monotonic() + 300
    while len(losses_by_step(run_dir) if (run_dir / "metrics.jsonl").is_file() else {}) < 5:
        assert time.monotonic() < deadline, job_info(job)
        assert job_info(job)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), job_info(job)
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    deadline = time.monotonic() + 120
    while (info := job_info(job))["Restarts"] == "0" or info["JobState"] != "PENDING":
        assert info["JobState"] not in ("COMPLETED", "FAILED"), f"not requeued: {info}"
        assert time.monotonic() < deadline, f"not requeued: {info}"
        time.sleep(0.5)


def release(job: str) -> dict[str, str]:
    # Slurm holds a requeued job ~2 minutes (BeginTime); release it sooner, but not at once: a
    # relaunch within the second of the kill finds its new credential revoked and fails the job.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+5"], check=True)
    return wait_for(job, "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


def test_preempted_job_checkpoints_requeues_and_resumes_exactly(uninterrupted, dataset, tmp_path):
    _, _, _, reference = uninterrupted
    run_dir = tmp_path / "run"
    job = submit(tmp_path, "preempt", tiny_overrides(dataset, run_dir, **{"train.steps": STEPS}))
    preempt_until_requeued(job, run_dir)
    info = release(job)
    batch, nodes = logs(tmp_path, "preempt", job)
    assert info["JobState"] == "COMPLETED", batch + nodes[-3000:]
    assert "SIGUSR1" in batch and "requeueing job" in batch and "restart 1:" in batch
    stopped_at = int(nodes.split("stopped by signal 15 at step ")[1].split(";")[0])
    assert 5 <= stopped_at < STEPS
    assert f"resumed from {run_dir}/checkpoints/step_{stopped_at:08d} at step {stopped_at}" in nodes
    resumed = losses_by_step(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert resumed == reference  # every step, before and after the requeue, as if never stopped


def test_job_requeued_on_fewer_nodes_resumes_on_its_new_layout(cluster, dataset, tmp_path):
    """Started on 2 nodes (DP=2, ZeRO-1), preempted, requeued while one node is drained: the job
    comes back on 1 node, reshards the checkpoint and the data position, doubles grad
    accumulation to keep the global batch, and finishes."""
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(dataset, run_dir, **{"train.steps": STEPS, "parallel.zero_stage": 1})
    job = submit(tmp_path, "shrink", overrides, sbatch_args=("--nodes=1-2",))
    preempt_until_requeued(job, run_dir)
    subprocess.run(["scontrol", "update", "NodeName=pnode2", "State=DRAIN", "Reason=shrink-test"], check=True)
    try:
        info = release(job)
    finally:
        subprocess.run(["scontrol", "update", "NodeName=pnode2", "State=RESUME"], check=True)
    batch, nodes = logs(tmp_path, "shrink", job)
    assert info["JobState"] == "COMPLETED", batch + nodes[-3000:]
    assert "restart 0: 2 node(s) x 1 process(es)" in batch and "restart 1: 1 node(s) x 1 process(es)" in batch
    assert "world 2 (tp 1, pp 1, dp 2)" in nodes and "world 1 (tp 1, pp 1, dp 1)" in nodes
    assert "train.grad_accum 1 -> 2 for 1 data-parallel rank(s) (the checkpoint had 2)" in nodes
    assert "data loader resharded (world_size 2 -> 1)" in nodes
    assert sorted(losses_by_step(run_dir)) == list(range(1, STEPS + 1))


def test_bad_config_job_fails_with_the_error_in_its_log(cluster, dataset, tmp_path):
    job = submit(tmp_path, "bad", tiny_overrides(dataset, tmp_path / "run", **{"model.no_such_key": 1}))
    info = wait_for(job, "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
    batch, _ = logs(tmp_path, "bad", job)
    assert info["JobState"] == "FAILED", info
    assert info["ExitCode"].startswith("2:"), info  # the CLI's configuration-error status
    assert "model.no_such_key" in batch and "config check failed" in batch
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def submit_ray(tmp_path: Path, name: str, command: list[str], **env: str) -> str:
    """slurm/ray_cluster.sbatch COMMAND; the test's own RAY_AUTH_* do not leak into the job."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")},
           "PRETRAIN_PYTHON": sys.executable, "PRETRAIN_LOG_ROOT": str(tmp_path / "logs"), **env}
    out = subprocess.run(["sbatch", "--parsable", f"--job-name={name}", f"--output={tmp_path}/%x-%j.out",
                          str(ROOT / "slurm" / "ray_cluster.sbatch"), *command],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def test_ray_cluster_job_runs_a_tune_search_against_every_node(cluster, dataset, tmp_path):
    """slurm/ray_cluster.sbatch starts Ray on both nodes and runs `pretrain tune` against it
    (RAY_ADDRESS exported): two FIFO trials finish, then Ray stops everywhere."""
    import yaml

    spec = yaml.safe_load((ROOT / "configs" / "tune" / "pbt_tiny.yaml").read_text())
    spec["overrides"] += [f"data.path={dataset}", "train.steps=20", "model.seq_length=32"]
    spec.update(num_samples=2, cpus_per_trial=1, scheduler={"name": "fifo"})
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(spec))
    job = submit_ray(tmp_path, "ray", [sys.executable, "-m", "pretrain", "tune", "--config",
                                       str(tmp_path / "tune.yaml"), "--out", str(tmp_path / "tune")])
    info = wait_for(job, "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
    batch = (tmp_path / f"ray-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", batch[-3000:]
    assert "Ray cluster ready: 2/2 nodes" in batch and "ray: 2 node(s)" in batch
    summary = json.loads((tmp_path / "tune" / "summary.json").read_text())
    assert [t["final_step"] for t in summary["trials"]] == [20, 20]
    assert "stopping Ray on 2 node(s)" in batch
    ps = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True).stdout
    assert not [p for p in ps.splitlines() if "raylet" in p and not p.startswith("Z")]


# COMMAND for the Ray job below: the job's own driver, then two that lack its token, connecting
# to the head by address (RAY_ADDRESS) as anything on the cluster network could.
AUTH_PROBE = """
import os, subprocess, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

token = os.environ["RAY_AUTH_TOKEN_PATH"]
print("modes", oct(os.stat(os.path.dirname(token)).st_mode & 0o777), oct(os.stat(token).st_mode & 0o777))
ray.init(logging_level="ERROR", log_to_driver=False)
where = ray.remote(lambda: os.environ["SLURMD_NODENAME"])
on_node = [NodeAffinitySchedulingStrategy(n["NodeID"], soft=False) for n in ray.nodes() if n["Alive"]]
ran_on = ray.get([where.options(scheduling_strategy=s).remote() for s in on_node])
print("with the token, tasks ran on", sorted(ran_on))
ray.shutdown()

# No auth settings at all (and an empty HOME, so no ~/.ray/auth_token), or a wrong token.
# RAY_gcs_server_port_wait_time_s: a refused driver gives up after ~3 connect attempts, not ~20.
none = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {"HOME": sys.argv[1],
        "RAY_gcs_server_port_wait_time_s": "3"}
wrong = none | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
drivers = {"no token": none, "wrong token": wrong}
connect = "import ray; ray.init(logging_level='ERROR', log_to_driver=False); print('CONNECTED')"
procs = {name: subprocess.Popen([sys.executable, "-c", connect], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for name, env in drivers.items()}
for name, proc in procs.items():
    out = proc.communicate(timeout=180)[0]
    print(f"{name}: exit {proc.returncode}, connected {'CONNECTED' in out}, "
          f"refused {'Authentication token is missing or incorrect' in out}")
"""


def test_ray_cluster_job_requires_its_token(cluster, tmp_path):
    """By default the Ray cluster of a job takes only drivers that hold the job's token (a
    per-job file only the user can read), and the token is gone once the job ends."""
    (tmp_path / "probe.py").write_text(AUTH_PROBE)
    (tmp_path / "home").mkdir()
    # A token left in the submitting shell is not the job's: it is the probe's "wrong token".
    job = submit_ray(tmp_path, "rayauth",
                     [sys.executable, str(tmp_path / "probe.py"), str(tmp_path / "home")],
                     RAY_AUTH_TOKEN="0" * 64)
    info = wait_for(job, "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
    batch = (tmp_path / f"rayauth-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", batch[-3000:]
    assert "Ray cluster ready: 2/2 nodes" in batch  # the worker node joined with the token
    assert "modes 0o700 0o600" in batch
    assert "with the token, tasks ran on ['pnode1', 'pnode2']" in batch
    assert "no token: exit 1, connected False, refused True" in batch, batch[-3000:]
    assert "wrong token: exit 1, connected False, refused True" in batch, batch[-3000:]
    assert not (tmp_path / "logs" / f"rayauth-{job}" / "ray-auth").exists()


def test_ray_cluster_job_refuses_an_unknown_auth_mode(cluster, tmp_path):
    job = submit_ray(tmp_path, "raymode", ["true"], RAY_AUTH_MODE="tokn")
    info = wait_for(job, "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
    batch = (tmp_path / f"raymode-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"].startswith("2:"), info
    assert "RAY_AUTH_MODE=tokn: expected token (the default) or disabled" in batch
    assert "Ray head" not in batch  # refused before starting anything


# -- slurm/prepare.sbatch: one dataset prepared by every node of a job ---------------------------
PREPARE_SBATCH = ROOT / "slurm" / "prepare.sbatch"
# Small units and shards so that each node gets several items; sentencepiece so that the
# tokenizer phase trains on a sample drawn by both nodes' scans.
PREPARE_OPTIONS = {"tokenizer": "sentencepiece", "vocab_size": 400, "unit_mb": 0.05, "val_fraction": 0.2,
                   "shard_mb": 0.02, "dedup_partitions": 8}
PREPARE_ARGS = [a for k, v in PREPARE_OPTIONS.items() for a in (f"--{k.replace('_', '-')}", str(v))]
DUPLICATES = 4  # documents in the corpus below that repeat an earlier one exactly
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


def make_corpus(root: Path) -> Path:
    """~420 KB: 6 JSONL files (41 documents each) and 11 text files; three documents appear in two
    JSONL files each and one of them again as a text file."""
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog naïve café ünïcödé 日本語 to be or not that is".split()

    def doc(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))
    repeated = [doc(200) for _ in range(3)]
    root.mkdir()
    for i in range(6):
        docs = [doc(rng.randint(50, 300)) for _ in range(40)] + [repeated[i % 3]]
        (root / f"part_{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    (root / "txt").mkdir()
    for i in range(10):
        (root / "txt" / f"t{i}.txt").write_text(doc(2000) + "\n", encoding="utf-8")
    (root / "txt" / "again.txt").write_text(repeated[0], encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def prepare_corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("prepare") / "corpus")


@pytest.fixture(scope="module")
def local_manifest(prepare_corpus) -> dict:
    """The reference: the same sources and options prepared here by one process, one worker."""
    from data_pipeline.prepare import prepare

    manifest = prepare(str(prepare_corpus), prepare_corpus.parent / "local", workers=1, log=lambda *_: None,
                       **PREPARE_OPTIONS)
    assert manifest["duplicates_removed"] == DUPLICATES
    return manifest


def submit_prepare(tmp_path: Path, name: str, args: list[str], **env: str) -> str:
    env = {**os.environ, "PRETRAIN_PYTHON": sys.executable, **env}
    out = subprocess.run(["sbatch", "--parsable", f"--job-name={name}", f"--output={tmp_path}/%x-%j.out",
                          str(PREPARE_SBATCH), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def items_per_node(log: str, phase: str) -> dict[str, int]:
    """{node: items} from prepare's own "scan: 3 items, ..." lines, which the job prefixes with
    the phase and node (a task with no items prints none)."""
    return {node: int(n) for node, n in re.findall(rf"^\[{phase} (\S+)\] {phase}: (\d+) items", log, re.M)}


@pytest.fixture(scope="module")
def prepare_job(cluster, prepare_corpus, tmp_path_factory):
    """slurm/prepare.sbatch on 2 nodes (default workers) over the corpus: (tmp dir, job id, info, out)."""
    tmp = tmp_path_factory.mktemp("prepare_job")
    out = tmp / "ds"
    job = submit_prepare(tmp, "prep", ["--source", str(prepare_corpus), "--out", str(out), *PREPARE_ARGS])
    return tmp, job, wait_for(job, *FINISHED, timeout=180), out


def test_prepare_job_on_two_nodes_matches_a_one_process_prepare(prepare_job, local_manifest):
    from data_pipeline.prepare import manifest_digest
    from data_pipeline.verify import verify

    tmp, job, info, out = prepare_job
    log = (tmp / f"prep-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert info["NumNodes"] == "2" and info["NodeList"] == "pnode[1-2]"
    assert re.search(rf"prepare {re.escape(str(out))} on 2 node\(s\) x \d+ worker\(s\) \(new\)", log)  # workers: the node's CPUs
    units = int(re.search(r"^\[plan pnode1\] plan: .* in (\d+) units$", log, re.M)[1])
    assert units >= 4
    for phase in ("scan", "write"):  # each node did its own share of the items
        per_node = items_per_node(log, phase)
        assert sorted(per_node) == ["pnode1", "pnode2"] and sum(per_node.values()) == units, (phase, per_node)
        for node in ("pnode1", "pnode2"):
            assert f"{phase} task {int(node[-1]) - 1}/2 on {node}: exit 0" in log
    for phase in ("plan", "scan", "dedup", "tokenizer", "write", "finalize"):
        assert re.search(rf"phase {phase}: done in \d+\.\d s", log), phase
    assert "[tokenizer pnode1] training sentencepiece bpe (400 pieces)" in log
    assert not (out.parent / "ds.partial").exists()
    assert manifest_digest(out) == local_manifest["digest"]
    assert f"[finalize pnode1] manifest digest {local_manifest['digest']}" in log
    assert json.loads((out / "manifest.json").read_text())["duplicates_removed"] == DUPLICATES
    assert verify(out) == []


def test_prepare_job_submitted_again_leaves_the_finished_dataset_alone(prepare_job, prepare_corpus, local_manifest):
    tmp, first, _, out = prepare_job
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    job = submit_prepare(tmp, "again", ["--source", str(prepare_corpus), "--out", str(out), *PREPARE_ARGS])
    info = wait_for(job, *FINISHED, timeout=120)
    log = (tmp / f"again-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    assert f"is already prepared with these options (manifest digest {local_manifest['digest']})" in log
    assert "phase plan" not in log
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_prepare_job_resumes_an_unfinished_prepare(cluster, prepare_corpus, local_manifest, tmp_path):
    """An earlier attempt planned and scanned some units, then died: the job finishes it, scanning
    only the rest, and the dataset is the one an uninterrupted prepare writes."""
    from data_pipeline.prepare import manifest_digest, prepare

    out = tmp_path / "ds"
    for phase, task in (("plan", 0), ("scan", 0)):  # scan: units 0, 3, 6, ... (task 0 of 3)
        prepare(str(prepare_corpus), out, phase=phase, task_index=task, task_count=1 if phase == "plan" else 3,
                log=lambda *_: None, **PREPARE_OPTIONS)
    units = len(json.loads((tmp_path / "ds.partial" / "plan.json").read_text())["units"])
    done = len(range(0, units, 3))
    job = submit_prepare(tmp_path, "resume", ["--source", str(prepare_corpus), "--out", str(out), *PREPARE_ARGS],
                         PREPARE_WORKERS="1")
    info = wait_for(job, *FINISHED, timeout=180)
    log = (tmp_path / f"resume-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert "x 1 worker(s) (resume)" in log and "[plan pnode1] resuming the unfinished prepare" in log
    scanned = items_per_node(log, "scan")
    assert sorted(scanned) == ["pnode1", "pnode2"] and sum(scanned.values()) == units - done, scanned
    assert sum(items_per_node(log, "write").values()) == units
    assert manifest_digest(out) == local_manifest["digest"]


def test_prepare_job_refuses_the_flags_it_sets(cluster, prepare_corpus, tmp_path):
    job = submit_prepare(tmp_path, "flags", ["--source", str(prepare_corpus), "--out", str(tmp_path / "ds"),
                                             "--workers", "4"])
    info = wait_for(job, *FINISHED, timeout=120)
    log = (tmp_path / f"flags-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"].startswith("2:"), (info, log)
    assert "--workers is set by the job" in log and "PREPARE_WORKERS" in log
    assert "phase plan" not in log and not (tmp_path / "ds.partial").exists()


def test_local_cluster_start_is_idempotent_and_stop_leaves_no_daemon(cluster):
    # Runs last in this module: it stops the cluster, then starts it again for whoever started it.
    again = subprocess.run([CLUSTER, "start"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already running" in again.stdout, again.stdout + again.stderr
    assert subprocess.run([CLUSTER, "status"], capture_output=True).returncode == 0

    # `stop` itself waits until every daemon has exited (SIGKILL after 30 s, up to 3 groups of
    # daemons), so the check right after it is the contract, not a race.
    stopped = subprocess.run([CLUSTER, "stop"], capture_output=True, text=True, timeout=200)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    ps = subprocess.run(["ps", "-eo", "pid=,stat=,comm="], capture_output=True, text=True).stdout
    left = [line for line in ps.splitlines() if line.split()[2] in DAEMONS
            and not line.split()[1].startswith("Z")]  # exited, awaiting their parent's wait
    assert not left, f"daemons still running after stop: {left}"
    assert subprocess.run([CLUSTER, "status"], capture_output=True).returncode != 0

    restarted = subprocess.run([CLUSTER, "start"], capture_output=True, text=True, timeout=300)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    # `start` returns once both nodes are schedulable; a loaded slurmctld may still answer slowly.
    deadline = time.monotonic() + 60
    while (nodes := node_states()) != ["pnode1", "idle", "pnode2", "idle"]:
        assert time.monotonic() < deadline, f"nodes not idle 60 s after start: {nodes}"
        time.sleep(0.5)
