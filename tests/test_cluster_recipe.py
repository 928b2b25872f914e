"""docs/cluster.md's single-machine recipe, run exactly as written.

The shell lines between ``<!-- recipe:single-machine -->`` and ``<!-- /recipe -->`` (one ```bash block) run
with ``bash -euo pipefail`` from the repository root, in a shell whose ``PATH`` does NOT contain ``.venv/bin``
(the user has activated nothing) and whose ``HOME`` is an empty folder of the test's own (the token the
recipe generates lands there, nothing of the user's is touched).  Only what a test on a shared machine must
change is replaced, each exactly once: the ports (Ray's defaults ``6379``, ``10001``, ``8265``, ``52365``,
which another Ray instance on the machine may hold) by free ones, ``--temp-dir /tmp/ray`` by the test's own
and ``--num-cpus 8`` by 2 (this machine's cores).  The recipe's job writes under ``$HOME``, so its storage
path needs no change.  The head it starts is stopped by killing only its processes (command line naming the
temp dir, or environment carrying the test's HOME); never ``ray stop``.  Without the recipe's
``PATH="$PWD/.venv/bin:$PATH"`` prefix on ``ray start`` this test fails with ``No module named 'pyarrow'``
(the job's ``python`` would be the system's).
"""
from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
from test_job_submit import REPO, VENV_BIN, LocalHead, _our_processes

DOC = REPO / "docs" / "cluster.md"
BEGIN, END = "<!-- recipe:single-machine -->", "<!-- /recipe -->"
RECIPE_TIMEOUT_S = 300  # ~25 s on a 2-core machine, also while another test suite runs


def recipe_script() -> str:
    """The recipe's shell lines, as the doc shows them."""
    text = DOC.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) >= 1, f"recipe markers missing in {DOC}"
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    m = re.fullmatch(r"\s*```bash\n(.*?)```\s*", block, re.S)
    assert m, f"the recipe in {DOC} must be exactly one ```bash block between the markers"
    return m.group(1)


def substituted(script: str, head: LocalHead) -> str:
    """Replace the ports, the temp dir and the CPU count; nothing else."""
    subs = [("--port 6379", f"--port {head.gcs}"),
            ("--ray-client-server-port 10001", f"--ray-client-server-port {head.client}"),
            ("--dashboard-port 8265", f"--dashboard-port {head.dash}"),
            ("--dashboard-agent-listen-port 52365", f"--dashboard-agent-listen-port {head.agent_http}"),
            ("--address http://127.0.0.1:8265", f"--address {head.address}"),
            ("--temp-dir /tmp/ray", f"--temp-dir {head.tmp / 'r'}"), ("--num-cpus 8", "--num-cpus 2")]
    for old, new in subs:
        assert script.count(old) == 1, f"the recipe must contain {old!r} exactly once:\n{script}"
        script = script.replace(old, new)
    for left in ("6379", "10001", "8265", "52365", "/tmp/ray "):
        assert left not in script, f"{left!r} left in the recipe after substitution:\n{script}"
    return script


def _user_env(home: Path) -> dict:
    """A user's shell: no virtualenv on PATH or active, no Ray settings, an empty HOME."""
    venv = VENV_BIN.resolve()
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and Path(d).resolve() != venv]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") and k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(HOME=str(home), PATH=os.pathsep.join(path), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    return env


def test_recipe_is_extracted_and_only_ports_tempdir_and_cpus_change():
    script = recipe_script()
    assert "chmod 600 ~/.ray/auth_token" in script and "ray stop" not in script
    head = LocalHead()  # only its temp dir name and free ports; nothing is started
    try:
        out = substituted(script, head)
    finally:
        head.stop()
    changed = [(a, b) for a, b in zip(script.splitlines(), out.splitlines()) if a != b]
    assert len(out.splitlines()) == len(script.splitlines()) and len(changed) == 4, changed


@pytest.mark.integration
@pytest.mark.slow
def test_single_machine_recipe_runs_as_written():
    head = LocalHead()  # its short temp dir, empty HOME, free ports and stop(); the recipe starts the head
    try:
        env = _user_env(head.home)
        assert str(VENV_BIN) not in env["PATH"].split(os.pathsep)
        script = substituted(recipe_script(), head)
        p = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=RECIPE_TIMEOUT_S)
        out = f"--- script\n{script}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"
        assert p.returncode == 0, out
        assert "[job simulate] SUCCEEDED" in p.stdout + p.stderr, out
        # The job's output, where the recipe says it lands.
        sim = head.home / "mtrec" / "first-job" / "sim"
        assert (sim / "truth" / "summary.json").is_file(), out
        assert sorted((sim / "logs").glob("day=*/*.parquet")), out
        # The token the recipe generated is readable by its owner only.
        ray_dir = head.home / ".ray"
        assert stat.S_IMODE(ray_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((ray_dir / "auth_token").stat().st_mode) == 0o600
        # The head that ran the job is the one the test started (its own temp dir).
        assert any(str(head.tmp / "r") in " ".join(pr.info["cmdline"] or []) for pr in _our_processes(head.home, head.tmp))
    finally:
        head.stop()
    assert not _our_processes(head.home, head.tmp), "processes of the recipe's Ray head survived stop()"
