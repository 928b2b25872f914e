"""The stage runner (mtrec_dist/stages.py) on toy stages: records, skipping on resume, reruns on change.

No Ray here: the runner only sequences functions; tests/test_pipeline_resume.py kills a real pipeline.
"""
from __future__ import annotations

import json
import os

import pytest

from mtrec_dist.config import PipelineConfig
from mtrec_dist.stages import RunContext, Stage, StageRunner, input_files


class Boom(RuntimeError):
    pass


def _ctx(tmp_path, lines):
    return RunContext(PipelineConfig(run_dir=str(tmp_path / "run")), progress=False, say=lines.append)


def _stages(calls, conf=None, fail=None, files=None):
    """a -> b -> c; each appends its name to ``calls`` and returns its input's value + 1."""
    conf = conf or {}

    def make(name, prev):
        def run(done):
            calls.append(name)
            if fail == name:
                raise Boom(name)
            return {"value": (done[prev]["value"] if prev else 0) + 1}
        return run

    return [Stage("a", make("a", None), config=conf.get("a"), files=files),
            Stage("b", make("b", "a"), config=conf.get("b"), inputs=["a"]),
            Stage("c", make("c", "b"), config=conf.get("c"), inputs=["b"])]


def test_records_are_written_and_a_resume_skips_everything_done(tmp_path):
    lines, calls = [], []
    ctx = _ctx(tmp_path, lines)
    out = StageRunner(ctx).run(_stages(calls))
    assert calls == ["a", "b", "c"] and out["c"] == {"value": 3}
    recs = {p.name: json.loads(p.read_text()) for p in (tmp_path / "run" / "stages").iterdir()}
    assert sorted(recs) == ["a.json", "b.json", "c.json"]
    assert recs["b.json"]["inputs"]["stages"] == {"a": recs["a.json"]["fingerprint"]}
    assert all(r["seconds"] >= 0 and r["finished_at"] for r in recs.values())

    calls.clear()
    runner = StageRunner(ctx, resume=True)
    out = runner.run(_stages(calls))
    assert calls == [] and runner.skipped == ["a", "b", "c"] and out["c"] == {"value": 3}
    assert runner.timings == {}


def test_a_failed_stage_is_not_recorded_and_resume_starts_there(tmp_path):
    lines, calls = [], []
    ctx = _ctx(tmp_path, lines)
    with pytest.raises(Boom):
        StageRunner(ctx).run(_stages(calls, fail="b"))
    assert calls == ["a", "b"]
    assert sorted(p.name for p in (tmp_path / "run" / "stages").iterdir()) == ["a.json"]
    calls.clear()
    runner = StageRunner(ctx, resume=True)
    runner.run(_stages(calls))
    assert calls == ["b", "c"] and runner.skipped == ["a"] and set(runner.timings) == {"b", "c"}
    assert any("resuming at b" in line for line in lines)


def test_a_changed_config_reruns_that_stage_and_everything_after_it(tmp_path):
    calls = []
    ctx = _ctx(tmp_path, [])
    StageRunner(ctx).run(_stages(calls, conf={"b": {"lr": 1}}))
    calls.clear()
    StageRunner(ctx, resume=True).run(_stages(calls, conf={"b": {"lr": 2}}))
    assert calls == ["b", "c"]
    calls.clear()
    StageRunner(ctx, resume=True).run(_stages(calls, conf={"b": {"lr": 2}}))
    assert calls == []


def test_a_stage_redone_voids_the_later_records_even_if_killed(tmp_path):
    """a reruns (its output vanished) and the run dies in b: c's old record must not survive into the
    next resume, whose b then feeds a new c."""
    calls = []
    ctx = _ctx(tmp_path, [])
    out_a = tmp_path / "a.out"

    def stages(fail=None):
        s = _stages(calls, fail=fail)
        run_a = s[0].run

        def write_a(done):
            out_a.write_text("x")
            return run_a(done)

        s[0].run, s[0].paths = write_a, (lambda out: [str(out_a)])
        return s

    StageRunner(ctx).run(stages())
    out_a.unlink()
    calls.clear()
    with pytest.raises(Boom):
        StageRunner(ctx, resume=True).run(stages(fail="b"))
    assert calls == ["a", "b"]
    assert not (tmp_path / "run" / "stages" / "c.json").exists()
    calls.clear()
    StageRunner(ctx, resume=True).run(stages())
    assert calls == ["b", "c"]


def test_changed_input_files_rerun_the_stage(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    f = logs / "part-0.csv"
    f.write_text("user_id,item_id,ts\n1,2,3\n")
    calls = []
    ctx = _ctx(tmp_path, [])
    files = lambda: input_files(str(logs), "csv")  # noqa: E731
    StageRunner(ctx).run(_stages(calls, files=files))
    calls.clear()
    StageRunner(ctx, resume=True).run(_stages(calls, files=files))
    assert calls == []
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    StageRunner(ctx, resume=True).run(_stages(calls, files=files))
    assert calls == ["a", "b", "c"]


def test_without_resume_the_earlier_records_are_dropped(tmp_path):
    calls = []
    ctx = _ctx(tmp_path, [])
    StageRunner(ctx).run(_stages(calls))
    calls.clear()
    StageRunner(ctx).run(_stages(calls)[:1])
    assert calls == ["a"]
    assert sorted(p.name for p in (tmp_path / "run" / "stages").iterdir()) == ["a.json"]


def test_the_popularity_sampler_enters_the_training_stages_fingerprints_and_the_uniform_one_does_not(tmp_path):
    """Its item counts changed source (session 25): a run trained with the older counts trains again on resume,
    while the default sampler's fingerprints stay as they were."""
    from mtrec_dist.config import load_config
    from mtrec_dist.stages import RunContext, model_stages

    def configs(*sets):
        cfg = load_config(None, [f"run_dir={tmp_path}", "rec.backbones=[sasrec]", "rec.guidances=[none]", *sets])
        return {s.name: s.config for s in model_stages(RunContext(cfg, progress=False), str(tmp_path / "prep"))}

    uniform = configs()
    popular = configs("reward.num_negatives=8", "reward.negative_sampler=popularity",
                      "rec.num_negatives=8", "rec.negative_sampler=popularity")
    assert all("popularity_counts" not in c for c in uniform.values() if isinstance(c, dict))
    assert popular["train-reward"]["popularity_counts"] == popular["train-rec sasrec/none"]["popularity_counts"]


def test_the_recommenders_train_in_one_run_and_a_failure_keeps_the_finished_ones(tmp_path, monkeypatch):
    """The train-rec stages call one ``train_recommenders`` for every variant from the first that runs; when that
    run fails after the first variant finished, the first stage is recorded, the second raises the failure, and
    a resume trains only the second and third (again in one run)."""
    from mtrec_dist.config import load_config
    from mtrec_dist.stages import model_stages
    from mtrec_dist.training import recommender
    from mtrec_dist.training.loop import JobsFailed

    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "rec.backbones=[sasrec]",
                             "rec.guidances=[none,reweight,risk_averse]"])
    runs = []

    def fake_train(cfg, scored, prepared, jobs, **kwargs):
        runs.append([j.guidance for j in jobs])
        outs = [{"checkpoint_path": str(tmp_path), "guidance": j.guidance} for j in jobs]
        if len(runs) == 1:
            raise JobsFailed("the second job failed", outs[:1])
        return outs

    monkeypatch.setattr(recommender, "train_recommenders", fake_train)

    def stages():  # each command builds its stages anew
        recs = [s for s in model_stages(RunContext(cfg, progress=False), str(tmp_path / "prep"))
                if s.name.startswith("train-rec")]
        for s in recs:
            s.inputs = ["score-rewards"]
        return [Stage("train-reward", lambda done: {}), Stage("score-rewards", lambda done: {})] + recs

    with pytest.raises(JobsFailed):
        StageRunner(RunContext(cfg, progress=False)).run(stages())
    assert runs == [["none", "reweight", "risk_averse"]]
    lines = []
    done = StageRunner(RunContext(cfg, progress=False, say=lines.append), resume=True).run(stages())
    assert [x.split(" done in ")[1].split("s", 1)[1] for x in lines if "train-rec" in x and " done in " in x] == \
        [" (all 2 in one run)", " (trained in train-rec sasrec/reweight's run)"]
    assert runs[1] == ["reweight", "risk_averse"]
    assert [done[f"train-rec sasrec/{g}"]["guidance"] for g in ("none", "reweight", "risk_averse")] == \
        ["none", "reweight", "risk_averse"]
