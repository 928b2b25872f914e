"""Real job submission against a real token-authenticated Ray head on 127.0.0.1.

The head is started with the venv's own ``ray`` binary (so a job's ``python`` is the venv's), in its own
HOME (the token ``ray get-auth-token --generate`` writes lives there, nothing of the user's is touched),
its own short ``--temp-dir`` and free ports, and stopped by killing only the processes it started: the
``ray start --block`` process, then every process whose command line names its temp dir or whose
environment carries its HOME.  ``ray stop`` is never used (it would kill every Ray cluster on the machine).
The tests without a cluster at the end cover jobs/_entry.py's argument handling and exit statuses.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray  # noqa: F401  (also puts Ray's bundled psutil on sys.path; the venv has no separate psutil)

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"

# The job the test submits: the whole MTRec pipeline on the tiny config, with a shorter training budget,
# one recommender and fewer online seeds (what is under test is the submission, its token and its storage
# path; test_pipeline covers the pipeline's results), to keep the test near a minute and a half on 2 CPUs.
JOB_ENTRYPOINT = [
    "python", "jobs/pipeline.py", "--config", "configs/tiny.yaml", "--quiet",
    "--set", "train.max_steps=8", "--set", "rec.guidances=[reweight]", "--set", "eval.online_seeds=2",
]
JOB_TIMEOUT_S = 900  # about 2 min on an idle 2-core box; generous for loaded CI machines
# What the job must leave under --storage-path.
JOB_OUTPUT = "report/report.html"
# A job that must fail with a clear message: inside a Ray job a relative --storage-path would land in the
# job's temporary copy of the working dir, so jobs/_entry.py refuses it (only detectable in a real job).
FAILING_ENTRYPOINT = ["python", "jobs/plan.py", "--items", "2001"]
FAILING_STORAGE = "relative/out"


def _free_ports(n: int) -> list:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _env(home: Path, token_mode: bool) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") and k not in ("PYTHONPATH",)}
    env.update(HOME=str(home), PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    if token_mode:
        env["RAY_AUTH_MODE"] = "token"
    return env


def _run(cmd, env, timeout=120, check=False):
    p = subprocess.run([str(c) for c in cmd], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def _our_processes(home: Path, tmp: Path, exclude=()):
    import psutil

    mine = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid in exclude or proc.pid == os.getpid():
            continue
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if str(tmp) in cmd or proc.environ().get("HOME") == str(home):
                mine.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return mine


def _http_status(url: str, token: str = "") -> int:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0  # nothing listening (yet)


class LocalHead:
    """A token-authenticated single-node Ray head on 127.0.0.1 that only this object can stop."""

    def __init__(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="mtj", dir="/tmp"))  # short: unix socket paths <= 107 chars
        self.home = self.tmp / "home"
        self.home.mkdir()
        self.env = _env(self.home, token_mode=True)
        (self.gcs, self.dash, self.agent_http, self.agent_grpc, self.rtenv, self.metrics, self.client,
         self.node_mgr, self.obj_mgr) = _free_ports(9)
        self.address = f"http://127.0.0.1:{self.dash}"
        self.proc = None
        self.log = self.tmp / "ray_start.log"

    def start(self, timeout=60):
        # `ray get-auth-token --generate` writes $HOME/.ray/auth_token: our temp HOME, not the user's.
        gen = _run([RAY, "get-auth-token", "--generate"], self.env, check=True)
        token_file = self.home / ".ray" / "auth_token"
        assert token_file.exists(), gen.stderr
        self.token = token_file.read_text().strip()
        assert gen.stdout.strip() == self.token and len(self.token) >= 16
        cmd = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", self.gcs,
               "--dashboard-host", "127.0.0.1", "--dashboard-port", self.dash, "--include-dashboard", "true",
               "--dashboard-agent-listen-port", self.agent_http, "--dashboard-agent-grpc-port", self.agent_grpc,
               "--runtime-env-agent-port", self.rtenv, "--metrics-export-port", self.metrics,
               "--ray-client-server-port", self.client, "--node-manager-port", self.node_mgr,
               "--object-manager-port", self.obj_mgr, "--temp-dir", self.tmp / "r", "--num-cpus", "2",
               "--num-gpus", "0", "--disable-usage-stats"]
        self.proc = subprocess.Popen([str(c) for c in cmd], env=self.env, cwd=self.tmp, start_new_session=True,
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log.read_text()}")
            # The job API is up once it answers an authenticated request.
            if _http_status(f"{self.address}/api/jobs/", self.token) == 200:
                return self
            time.sleep(0.5)
        raise TimeoutError(f"the Ray head did not answer on {self.address} within {timeout} s:\n"
                           f"{self.log.read_text()}")

    def stop(self):
        """Terminate every process this head started, and only those: ``ray start --block`` itself, then all
        processes whose command line names our temp dir or whose environment carries our HOME (raylet, GCS,
        dashboard, workers, job drivers).  SIGTERM first, SIGKILL after 10 s."""
        import psutil

        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # `ray start --block` only watches the others, and sits on SIGTERM for ~10 s
            self.proc.wait(timeout=10)
        procs = _our_processes(self.home, self.tmp)
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        for p in _our_processes(self.home, self.tmp):  # anything spawned while we were stopping
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def head():
    h = LocalHead()
    try:
        yield h.start()
    finally:
        h.stop()
        assert not _our_processes(h.home, h.tmp), "processes of the test's Ray head survived stop()"


def _submit(head, job_id, entrypoint, storage, env=None, wait=True, timeout=90):
    cmd = [RAY, "job", "submit", "--address", head.address, "--submission-id", job_id, "--working-dir", ".",
           "--runtime-env", "cluster/runtime_env.yaml"]
    if not wait:
        cmd.append("--no-wait")
    return _run([*cmd, "--", *entrypoint, "--storage-path", storage], env or head.env, timeout=timeout)


def _status(head, job_id) -> str:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"})
    deadline = time.time() + 60
    while time.time() < deadline:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(0.5)
    return status


@pytest.mark.integration
@pytest.mark.slow
def test_job_submit_with_token_succeeds_and_writes_outputs(head):
    storage = head.tmp / "storage"
    failing = _submit(head, "mtrec-fails", FAILING_ENTRYPOINT, FAILING_STORAGE, wait=False)
    assert failing.returncode == 0, failing.stderr
    p = _submit(head, "mtrec-ok", JOB_ENTRYPOINT, str(storage), timeout=JOB_TIMEOUT_S)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert _status(head, "mtrec-ok") == "SUCCEEDED"
    # The job ran the uploaded copy of the checkout, not the editable install under the repo.
    line = next(ln for ln in out.splitlines() if "mtrec_dist from" in ln)
    used = Path(line.split("mtrec_dist from", 1)[1].strip())
    assert str(head.tmp) in str(used) and REPO not in used.parents, line
    assert "[job pipeline] SUCCEEDED" in out and "report:" in out
    report = (storage / JOB_OUTPUT).read_text()
    assert "<td>sasrec</td><td>reweight</td>" in report and "<td>sasrec</td><td>none</td>" not in report
    summary = json.loads((storage / "pipeline.json").read_text())
    assert summary["report"] == str(storage / JOB_OUTPUT)
    metrics = json.loads((storage / "report" / "metrics.json").read_text())
    assert metrics["data"]["rows_in"] == metrics["data"]["rows_ok"] + metrics["data"]["rows_rejected"]
    assert all(r["curve"][-1]["step"] <= 8 for r in metrics["recommenders"])  # the --set overrides reached it

    # The failing job ends FAILED, with the reason in its logs and nothing written.
    assert _status(head, "mtrec-fails") == "FAILED"
    from ray.job_submission import JobSubmissionClient

    logs = JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"}).get_job_logs(
        "mtrec-fails")
    assert "is relative" in logs and "[job plan] FAILED" in logs, logs
    assert not (REPO / FAILING_STORAGE).exists()


@pytest.mark.integration
@pytest.mark.slow
def test_requests_without_or_with_a_wrong_token_are_refused(head):
    # The job API itself: 401 without a token, 403 with a wrong one, 200 with the right one.
    jobs_url = f"{head.address}/api/jobs/"
    assert _http_status(jobs_url) == 401
    assert _http_status(jobs_url, "not-the-token-" + "x" * 20) == 403
    assert _http_status(jobs_url, head.token) == 200
    # The dashboard (job API) listens on loopback only.  Ray itself rewrites --node-ip-address 127.0.0.1 to
    # the machine's address for GCS/raylet (services.resolve_ip_for_localhost); token auth guards those.
    from ray._private.services import get_node_ip_address

    node_ip = get_node_ip_address()
    if not node_ip.startswith("127."):
        assert _http_status(f"http://{node_ip}:{head.dash}/api/jobs/", head.token) == 0
    # The CLI, from a client with no token anywhere: its own empty HOME, no RAY_AUTH_* variables.
    bare_home = head.tmp / "bare_home"
    bare_home.mkdir(exist_ok=True)
    bare = _env(bare_home, token_mode=False)
    p = _run([RAY, "job", "list", "--address", head.address], bare, timeout=60)
    assert p.returncode != 0 and "Unauthorized: Missing authentication token" in p.stderr, p.stdout + p.stderr
    p = _submit(head, "mtrec-unauth", JOB_ENTRYPOINT, str(head.tmp / "storage_unauth"), env=bare)
    assert p.returncode != 0 and "Unauthorized: Missing authentication token" in p.stderr, p.stdout + p.stderr
    # Nothing was accepted: the refused submission is not among the cluster's jobs, and wrote nothing.
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"})
    ids = {j.submission_id for j in client.list_jobs()}
    assert "mtrec-ok" in ids and "mtrec-unauth" not in ids
    assert not (head.tmp / "storage_unauth").exists()


# ----------------------------------------------------------------------------------------------------
# jobs/_entry.py without a cluster (fast): argument handling and exit statuses
# ----------------------------------------------------------------------------------------------------


def _entry():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mtrec_jobs_entry", REPO / "jobs" / "_entry.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_entry_runs_the_command_and_writes_to_the_storage_path(tmp_path, capsys):
    rc = _entry().main("plan", ["--storage-path", str(tmp_path / "st"), "--items", "300", "--dim", "8",
                                "--world-size", "2", "--device", "cpu", "--ddr-gb", "1"])
    assert rc == 0
    assert json.loads((tmp_path / "st" / "plan.json").read_text())["inputs"]["num_items"] == 300
    assert "[job plan] SUCCEEDED" in capsys.readouterr().out


def test_entry_failures_are_non_zero_with_a_reason(tmp_path, capsys, monkeypatch):
    entry = _entry()
    assert entry.main("plan", ["--items", "300"]) == 2
    assert "--storage-path PATH_OR_URI is required" in capsys.readouterr().err
    # Inside a Ray job a relative storage path would vanish with the job's temporary working dir.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert entry.main("plan", ["--storage-path", "rel/out"]) == 2
    assert "is relative" in capsys.readouterr().err
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    rc = entry.main("plan", ["--storage-path", str(tmp_path), "--items", "1e9", "--dim", "128", "--world-size",
                             "2", "--device", "cpu", "--ddr-gb", "1"])
    err = capsys.readouterr().err
    assert rc == 3 and "does not fit" in err and "[job plan] FAILED" in err
    assert not (tmp_path / "plan.json").exists()
    # A job script (run as a script, like Ray runs it) whose command this checkout lacks says so.
    script = tmp_path / "nosuch.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(REPO / 'jobs')!r})\n"
                      "from _entry import run_job\nrun_job('no-such-command')\n")
    p = subprocess.run([sys.executable, str(script), "--storage-path", str(tmp_path)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "`mtrec no-such-command` is not available" in p.stderr
