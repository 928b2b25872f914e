"""`mtrec pipeline --resume`: a driver killed during train-rec resumes at that stage and produces the report.

The pipeline runs as `python -m mtrec_dist pipeline` in a subprocess with its own Ray (a private
RAY_TMPDIR, so it never attaches to the session's cluster).  The test watches the stage records appear
under <run_dir>/stages/, kills the driver's whole process group with SIGKILL while the recommender
is training, then reruns with --resume and checks, from the records and pipeline.json, that every stage that
had finished was skipped (records untouched, no timing in this run) and that the rest ran.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.integration, pytest.mark.slow]  # two tiny pipeline runs on Ray (about 3 minutes)

# One recommender and short budgets: the test is about which stages run, not about what they learn.
SMALL = ["train.max_steps=12", "train.report_every=4", "train.checkpoint_every=8", "simulator.num_users=120",
         "rec.guidances=[none]", "eval.online_seeds=2", "eval.online_users=15", "ablation.pipeline_rows=[]"]
FIRST_DONE = ["simulate", "prepare", "train-reward", "score-rewards"]
KILLED = "train-rec sasrec/none"


def _cmd(run_dir: Path, *extra: str) -> list:
    sets = [a for s in SMALL for a in ("--set", s)]
    return [sys.executable, "-m", "mtrec_dist", "pipeline", "--config", str(ROOT / "configs" / "tiny.yaml"),
            "--run-dir", str(run_dir), "--quiet", *sets, *extra]


def _kill_marked(marker: str) -> None:
    """SIGKILL every process (Ray's raylet, GCS, workers) whose environment carries this test's marker."""
    needle = f"MTREC_RESUME_TEST={marker}".encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                os.kill(int(d.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


@pytest.fixture()
def ray_env():
    tmp = tempfile.mkdtemp(prefix="mtr", dir="/tmp")  # short: Ray's unix socket paths must stay <= 107 chars
    marker = uuid.uuid4().hex
    env = {**os.environ, "RAY_TMPDIR": tmp, "MTREC_RESUME_TEST": marker, "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    yield env
    _kill_marked(marker)
    shutil.rmtree(tmp, ignore_errors=True)


def _records(run_dir: Path) -> dict:
    d = run_dir / "stages"
    return {json.loads(p.read_text())["stage"]: json.loads(p.read_text())
            for p in d.glob("*.json")} if d.is_dir() else {}


def test_killed_pipeline_resumes_at_the_stage_it_died_in(tmp_path, ray_env):
    run_dir = tmp_path / "run"
    log1 = tmp_path / "first.log"
    t0 = time.time()
    with open(log1, "w") as log:
        proc = subprocess.Popen(_cmd(run_dir), env=ray_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        killed_in = None
        deadline = time.time() + 240
        try:
            while time.time() < deadline and proc.poll() is None:
                recs = _records(run_dir)
                # Scores are recorded and the recommender's folder exists: it is training now.  Kill it mid-stage.
                if "score-rewards" in recs and (run_dir / "rec" / "sasrec-none").is_dir():
                    time.sleep(3)
                    killed_in = sorted(_records(run_dir))
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    _kill_marked(ray_env["MTREC_RESUME_TEST"])  # what Ray left behind
    first = log1.read_text()
    assert killed_in is not None, f"the pipeline never reached train-rec:\n{first[-3000:]}"
    assert sorted(FIRST_DONE) == killed_in, (killed_in, first[-3000:])
    assert not (run_dir / "report" / "report.html").exists()
    before = _records(run_dir)
    t_first = time.time() - t0

    t1 = time.time()
    res = subprocess.run(_cmd(run_dir, "--resume"), env=ray_env, cwd=ROOT, capture_output=True, text=True,
                         timeout=240)
    t_resume = time.time() - t1
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "resumed: 4 finished stage(s) skipped" in res.stdout
    for name in FIRST_DONE:
        assert f"{name}: done by an earlier run" in res.stderr
    assert f"resuming at {KILLED}" in res.stderr

    summary = json.loads((run_dir / "pipeline.json").read_text())
    assert summary["skipped"] == FIRST_DONE
    assert set(summary["timings_s"]) == {KILLED, "evaluate", "total"}
    after = _records(run_dir)
    for name in FIRST_DONE:  # untouched: same record, same finish time
        assert after[name] == before[name]
    assert set(after) == set(FIRST_DONE) | {KILLED, "evaluate"}
    assert after["evaluate"]["inputs"]["stages"][KILLED] == after[KILLED]["fingerprint"]

    report = run_dir / "report" / "report.html"
    assert report.exists() and "sasrec" in report.read_text()
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert [f"{r['backbone']}/{r['guidance']}" for r in metrics["recommenders"]] == ["sasrec/none"]
    assert metrics["recommenders"][0]["checkpoint"] == after[KILLED]["outputs"]["checkpoint_path"]
    # The same report figures: resuming a finished run skips every stage and rewrites the same report.
    again = subprocess.run(_cmd(run_dir, "--resume"), env=ray_env, cwd=ROOT, capture_output=True, text=True,
                           timeout=240)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    assert f"resumed: {len(after)} finished stage(s) skipped" in again.stdout
    metrics_again = json.loads((run_dir / "report" / "metrics.json").read_text())
    strip = lambda m: {k: v for k, v in m.items() if k != "timings_s"}  # noqa: E731  (wall times differ)
    assert strip(metrics_again) == strip(metrics)
    print(f"first run (killed) {t_first:.0f}s, resume {t_resume:.0f}s")
