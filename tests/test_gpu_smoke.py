"""The GPU smoke test's CPU side: it runs without Ray or a GPU, records each part, and says what it skipped."""
import json

import pytest
import torch

from mtrec_dist.bench import gpu_smoke


def test_cpu_machine_runs_cpu_parts_and_names_skipped_gpu_parts(tmp_path, capsys):
    assert gpu_smoke.main(["--out", str(tmp_path), "--models", "qriql,sasrec,sasrec/reweight", "--steps", "3"]) == 0
    report = json.loads((tmp_path / gpu_smoke.RESULT).read_text())
    sel = report["device_selection"]
    assert sel["ok"] and sel["result"]["backend"] == ("nccl" if torch.cuda.is_available() else "gloo")
    for model in ("qriql", "sasrec", "sasrec/reweight"):
        cpu = report["plain_throughput"][model]["cpu"]
        assert cpu["ok"], cpu
        assert cpu["result"]["samples_per_s"] > 0
    if not torch.cuda.is_available():
        assert report["nccl_all_reduce"]["error"].startswith("skipped")
        assert report["models_on_gpu"]["sasrec"]["error"].startswith("skipped")
    assert "plain sasrec" in capsys.readouterr().out


def test_a_failing_part_is_recorded_not_raised():
    part = gpu_smoke._part(lambda: 1 / 0)
    assert not part["ok"] and part["error"].startswith("ZeroDivisionError")


@pytest.mark.parametrize("argv", [["--steps", "2"], ["--models", "sasrec,bert4rec"], ["--models", "sasrec/boost"]])
def test_bad_arguments_are_refused(tmp_path, argv):
    with pytest.raises(SystemExit):
        gpu_smoke.main(["--out", str(tmp_path)] + argv)
