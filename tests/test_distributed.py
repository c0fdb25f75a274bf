"""Multi-rank jobs on CPU (gloo, 2 ranks; one rank for ``--nproc 1``): ``sfdiag run
--nproc``, the torchrun forms, DDP and FSDP2, rank agreement, a failing rank, Ctrl-C, the
in-repo optimizers on FSDP2 and probes under sharding.

Every job of this file starts at once in a module fixture (each rank imports torch);
the tests read what they left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import cli_env

from sfdiag.api import load_config, probe

pytestmark = pytest.mark.slow
pytest.importorskip("tensorboard")

REPO = Path(__file__).resolve().parent.parent
DDP = str(REPO / "examples" / "train_ddp.py")
FSDP = str(REPO / "tests" / "clients" / "train_fsdp.py")
PARITY = str(REPO / "tests" / "clients" / "fsdp_optimizers.py")
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
SFDIAG = [sys.executable, "-m", "sfdiag"]

PROBE_CONFIG = """\
seed: 0
steps: 4
model: mlp
data: {{batch_size: 16}}
optimizers:
  - adamw
  - sf-adamw
  - sf-ref
  - {{name: sf-sgd-wd, class: sf-sgd, kwargs: {{weight_decay: 0.01}}}}
distributed: {{nproc: 2, strategy: {strategy}}}
"""


@dataclass
class Job:
    code: int
    stdout: str
    stderr: str
    seconds: float
    out: Path

    def report(self) -> dict:
        return json.loads((self.out / "r.json").read_text())


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> dict[str, Job]:
    root = tmp_path_factory.mktemp("jobs")
    commands = {
        "ddp": [*SFDIAG, "run", "--nproc", "2", "--strict", "--report", "{out}/r.json", "--"]
        + ["python", DDP, "--logdir", "{out}/tb"],
        "torchrun-outside": [TORCHRUN, "--nproc-per-node", "2", "--standalone", "-m", "sfdiag"]
        + ["run", "--report", "{out}/r.json", "--", "python", DDP, "--logdir", "{out}/tb"],
        "torchrun-inside": [*SFDIAG, "run", "--report", "{out}/r.json", "--", "torchrun"]
        + ["--nproc-per-node", "2", DDP, "--logdir", "{out}/tb"],
        # one rank, as torchrun --nproc-per-node 1 runs it: the script still needs its rendezvous
        "ddp-one-rank": [*SFDIAG, "run", "--nproc", "1", "--report", "{out}/r.json", "--"]
        + ["python", DDP, "--logdir", "{out}/tb"],
        "torchrun-inside-one-rank": [*SFDIAG, "run", "--report", "{out}/r.json", "--"]
        + ["torchrun", "--nproc-per-node", "1", DDP, "--logdir", "{out}/tb"],
        "fail-before-step": [*SFDIAG, "run", "--nproc", "1", "--report", "{out}/r.json", "--"]
        + ["python", DDP, "--logdir", "{out}/tb", "--fail-rank", "0", "--fail-step", "0"],
        "fsdp": [*SFDIAG, "run", "--nproc", "2", "--report", "{out}/r.json", "--"]
        + ["python", FSDP, "{out}/tb"],
        "rescale": [*SFDIAG, "run", "--nproc", "2", "--strict", "--report", "{out}/r.json"]
        + ["--", "python", DDP, "--logdir", "{out}/tb", "--rescale-rank", "1"],
        "fail": [*SFDIAG, "run", "--nproc", "2", "--report", "{out}/r.json", "--", "python"]
        + [DDP, "--logdir", "{out}/tb", "--fail-rank", "1", "--fail-step", "3"],
        "parity": [TORCHRUN, "--nproc-per-node", "2", "--standalone", PARITY],
        "probe-ddp": [*SFDIAG, "probe", "{out}/ddp.yaml", "--format", "json"],
        "probe-fsdp2": [*SFDIAG, "probe", "{out}/fsdp2.yaml", "--format", "json"],
    }
    env = cli_env(PYTHONWARNINGS="ignore")
    started = {}
    for name, command in commands.items():
        out = root / name
        out.mkdir()
        for strategy in ("ddp", "fsdp2"):
            (out / f"{strategy}.yaml").write_text(PROBE_CONFIG.format(strategy=strategy))
        argv = [word.replace("{out}", str(out)) for word in command]
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        started[name] = (proc, out, time.monotonic())
    done = {}
    for name, (proc, out, began) in started.items():
        stdout, stderr = proc.communicate(timeout=300)
        done[name] = Job(proc.returncode, stdout, stderr, time.monotonic() - began, out)
    return done


def _one_job_report(job: Job, ranks: int = 2) -> dict:
    data = job.report()
    assert data["distributed"]["world_size"] == ranks
    assert data["distributed"]["backend"] == "gloo"
    assert job.stderr.count("logged metric") == 1, job.stderr  # one table, from rank 0
    assert job.stderr.count("audited as one job") == 1
    assert (f"{ranks} ranks (" if ranks > 1 else "1 rank (gloo, ddp)") in job.stderr
    assert all(f"rank {rank}: trained" in job.stdout for rank in range(ranks))
    return data


DDP_JOBS = {  # name -> ranks
    "ddp": 2,
    "torchrun-outside": 2,
    "torchrun-inside": 2,
    "ddp-one-rank": 1,
    "torchrun-inside-one-rank": 1,
}


@pytest.mark.parametrize(("name", "ranks"), DDP_JOBS.items())
def test_a_ddp_job_is_audited_as_one(jobs, name, ranks):
    job = jobs[name]
    data = _one_job_report(job, ranks)
    assert data["distributed"]["strategy"] == "ddp"
    assert data["distributed"]["ranks_agree"] is True
    (row,) = data["results"]
    assert (row["verdict"], row["fingerprint"]) == ("mutated", "adam-normalized")
    assert [r["rank"] for r in row["per_rank"]] == list(range(ranks))
    assert all(r["verdict"] == "mutated" and r["agrees"] for r in row["per_rank"])
    metrics = {m["name"]: m["verdict"] for m in data["metrics"]}
    assert metrics == {"train/grad_norm": "correct", "train/grad_norm_after_step": "post-step"}
    assert job.code == (1 if name == "ddp" else 0), job.stderr  # --strict on "ddp" only
    assert "FutureWarning" not in job.stderr


def test_fsdp2_grads_are_read_by_shard_and_judged_globally(jobs):
    job = jobs["fsdp"]
    assert job.code == 0, job.stderr
    data = job.report()
    assert data["distributed"]["strategy"] == "fsdp"
    (row,) = data["results"]
    assert (row["verdict"], row["error"]) == ("clean", None)  # no DTensor error row
    metrics = {m["name"]: m for m in data["metrics"]}
    assert metrics["train/grad_norm"]["verdict"] == "correct"
    local = metrics["grad_norm_local"]  # picked without --metric
    assert (local["verdict"], local["matches"]) == ("local-shard", "local-shard")
    assert local["logged_median"] < local["true_median"]
    assert "all-reduce" in local["advice"]
    # the job's norm is the global one, over both ranks' shards
    assert row["pre_step_grad_norm"] == pytest.approx(metrics["train/grad_norm"]["true_median"])


def test_ranks_that_step_different_gradients_are_named(jobs):
    job = jobs["rescale"]
    assert job.code == 1, job.stderr  # --strict fails on disagreeing ranks
    data = job.report()
    assert data["distributed"]["ranks_agree"] is False
    (line,) = data["distributed"]["disagreements"]
    assert "rank 1 differs from rank 0 at step 0" in line
    assert "RANKS STEP DIFFERENT GRADIENTS" in job.stderr and "rank 1 differs" in job.stderr
    agrees = {r["rank"]: r["agrees"] for r in data["results"][0]["per_rank"]}
    assert agrees == {0: True, 1: False}


def test_a_failing_rank_ends_the_job_quickly_with_its_error(jobs):
    job = jobs["fail"]
    assert job.code == 1
    # ended by itself, not by the other rank's collective timing out: no slower than the
    # whole run of the same script started beside it (a busy host slows both alike)
    assert job.seconds < max(90, jobs["ddp"].seconds + 30), (job.seconds, jobs["ddp"].seconds)
    assert "RuntimeError: rank 1 fails at step 3" in job.stderr
    assert "sfdiag: rank 1 failed with exit code 1" in job.stderr
    assert not (job.out / "r.json").exists()


def test_a_rank_that_fails_before_stepping_says_so(jobs):
    job = jobs["fail-before-step"]
    assert job.code == 1
    assert "RuntimeError: rank 0 fails at step 0" in job.stderr
    said = "sfdiag: rank 0: the script exited with code 1 before any optimizer stepped"
    assert said in job.stderr
    assert "stepped no" not in job.stderr
    assert not (job.out / "r.json").exists()


def test_in_repo_optimizers_on_fsdp2_match_one_process(jobs):
    job = jobs["parity"]
    assert job.code == 0, job.stderr
    errors = json.loads(job.stdout.strip().splitlines()[-1])
    assert len(errors) == 6
    assert all(error < 1e-5 for error in errors.values()), errors


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_probe_under_sharding_finds_what_one_process_finds(jobs, tmp_path, strategy):
    job = jobs[f"probe-{strategy}"]
    assert job.code == 0, job.stderr
    sharded = json.loads(job.stdout)
    assert sharded["config"]["distributed"] == {"nproc": 2, "strategy": strategy}
    single_yaml = tmp_path / "single.yaml"
    single_yaml.write_text(PROBE_CONFIG.format(strategy=strategy).rsplit("distributed", 1)[0])
    single = probe(load_config(single_yaml)).to_dict()

    def findings(data: dict) -> list[tuple]:
        return [(r["optimizer"], r["verdict"], r["fingerprint"]) for r in data["results"]]

    assert findings(sharded) == findings(single)
    assert findings(single)[1] == ("sf-adamw", "mutated", "adam-normalized")
    for got, want in zip(sharded["results"], single["results"], strict=True):
        assert got["pre_step_grad_norm"] == pytest.approx(want["pre_step_grad_norm"], rel=1e-4)
        assert got["post_step_grad_norm"] == pytest.approx(want["post_step_grad_norm"], rel=1e-3)


SLOW_DDP = """\
import os, sys, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
rank = dist.get_rank()
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(100000):
    optimizer.zero_grad()
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    if step == 2:
        open(os.path.join(sys.argv[1], f"ready{rank}"), "w").close()
    time.sleep(0.05)
"""


@pytest.mark.parametrize("a_rank", [True, False], ids=["a rank of a job", "a lone run"])
def test_once_ctrl_c_stopped_a_ranks_script_a_second_one_is_ignored(tmp_path, a_rank):
    """The launcher passes Ctrl-C on to every rank once more as it stops the job: a rank
    whose script the first one stopped ignores it (its part of the report, and rank 0's
    writing it, are under way; the launcher kills what still runs after its timeout). A
    lone run still stops at a second one."""
    from sfdiag.run import launch

    script = tmp_path / "stopped.py"
    script.write_text("raise KeyboardInterrupt\n")
    before = signal.getsignal(signal.SIGINT)
    try:
        code, interrupted, _ = launch.run_target(
            launch.Target(str(script), None, ()), interrupt_once=a_rank
        )
        now = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, before)
    assert (code, interrupted) == (130, True)
    assert (now is signal.SIG_IGN) == a_rank


def test_ctrl_c_ends_every_rank_with_130(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text(SLOW_DDP)
    proc = subprocess.Popen(
        [*SFDIAG, "run", "--nproc", "2", "--report", str(tmp_path / "r.json"), "--"]
        + ["python", str(script), str(tmp_path)],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to every process of the job
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["interrupted"] is True and data["distributed"]["world_size"] == 2
