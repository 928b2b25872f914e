"""The stages of a run and the one runner that executes them (shared by `mtrec pipeline` and `mtrec retrain`).

A :class:`Stage` names one step (``prepare``, ``train-rec sasrec/none``, ...), says what it reads (config
sections, earlier stages, input files) and holds the function that does it.  :class:`StageRunner` runs
stages in order, prints one line per stage, times each, and writes a record per finished stage to
``<run_dir>/stages/<stage>.json``::

    {"stage": "train-reward", "fingerprint": "9f3c...", "inputs": {"config": {...}, "stages": {"prepare":
     "ab12..."}, "files": [...]}, "outputs": {...}, "paths": [...], "started_at": "...", "finished_at": "...",
     "seconds": 12.3}

The fingerprint hashes the stage's config sections, its input stages' fingerprints and (prepare) its input
files' sizes and mtimes.  With ``resume``, the runner skips every stage whose record matches (same
fingerprint, output paths still there), reading its outputs back from the record, up to the first stage
that is not done; from there on every stage runs again, and the records from there on are dropped before
it starts, so a run killed mid-stage never leaves a record that a later resume could trust.  Without
``resume`` all records of an earlier run are dropped first: the run replaces the folder's outputs.

The stage *sequence* both commands share (train-reward -> score-rewards -> train-rec for every backbone x
guidance) is built by :func:`model_stages`; the pipeline puts simulate/prepare before it and evaluate/ablation
after it, retrain puts its carry-over prepare before it and passes a warm-start rule.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from mtrec_dist.choices import CLICK_TRAINED
from mtrec_dist.config import PipelineConfig, samples_by_popularity
from mtrec_dist.layout import RunLayout, rec_name

Outputs = Dict[str, Any]
# (checkpoint to warm-start from or None, why) for a model: ("reward" | "<backbone>-<guidance>", model_spec)
WarmRule = Callable[[str, Dict[str, Any]], Tuple[Optional[str], str]]


def say_stderr(msg: str) -> None:
    """Progress lines go to stderr, so a command's stdout stays its result."""
    print(msg, file=sys.stderr, flush=True)


@dataclass
class RunContext:
    """What every stage function needs: the run's config (``run_dir`` absolute), its layout and the console."""

    cfg: PipelineConfig
    progress: bool = True
    say: Callable[[str], None] = say_stderr
    tag: str = "pipeline"

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.cfg.run_dir)

    def line(self, msg: str) -> None:
        self.say(f"[{self.tag}] {msg}")


@dataclass
class Stage:
    """One step of a run.  ``run(done)`` gets the outputs of the stages before it (by name) and returns its
    own (JSON-able: they are stored in the stage's record and handed back on resume)."""

    name: str
    run: Callable[[Dict[str, Outputs]], Outputs]
    config: Any = None  # the config section(s) it reads: a change reruns it
    inputs: Sequence[str] = ()  # earlier stages it reads: their fingerprints enter its own
    files: Optional[Callable[[], list]] = None  # its input files as [path, size, mtime_ns] (prepare)
    paths: Callable[[Outputs], List[str]] = field(default=lambda out: [])  # must still exist to skip it
    note: Callable[[], str] = field(default=lambda: "")  # said after "done in ...s" (e.g. where it trained)


def _jsonable(o: Any) -> Any:
    """``json.dumps`` default: numpy scalars and arrays as Python numbers and lists, anything else (paths) as text."""
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def _slug(name: str) -> str:
    """A stage's record file name: ``train-rec sasrec/none`` -> ``train-rec_sasrec-none``."""
    return name.replace(" ", "_").replace("/", "-")


def now_utc() -> str:
    """The time now, UTC, ISO 8601 to the second (stage records, retrain.json)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class StageRunner:
    """Runs stages in order with one line per stage, timings, records and (``resume``) skipping."""

    def __init__(self, ctx: RunContext, *, resume: bool = False) -> None:
        self.ctx = ctx
        self.records = Path(ctx.layout.stages)
        self.resume = resume
        self.timings: Dict[str, float] = {}  # stages run by this call, seconds
        self.skipped: List[str] = []  # stages done by an earlier run
        self.outputs: Dict[str, Outputs] = {}
        self.fingerprints: Dict[str, str] = {}
        self._live = not resume  # once a stage runs, every later one runs too
        if not resume and self.records.exists():
            shutil.rmtree(self.records)

    def run(self, stages: Sequence[Stage]) -> Dict[str, Outputs]:
        """Run (or skip) each stage; returns every stage's outputs by name."""
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate stage names in {names}")
        for i, stage in enumerate(stages):
            self._run_one(stage, later=stages[i:])
        return self.outputs

    def _inputs(self, stage: Stage) -> Dict[str, Any]:
        """What the stage's fingerprint hashes: its config, its input stages' fingerprints, its input files."""
        missing = [n for n in stage.inputs if n not in self.fingerprints]
        if missing:
            raise ValueError(f"stage {stage.name!r} reads {missing}, which did not run before it")
        return {"config": stage.config, "stages": {n: self.fingerprints[n] for n in stage.inputs},
                "files": stage.files() if stage.files else []}

    def _record_path(self, name: str) -> Path:
        return self.records / f"{_slug(name)}.json"

    def _done_record(self, stage: Stage, fingerprint: str) -> Optional[Dict[str, Any]]:
        """The stage's record if it finished in an earlier run with these inputs and its outputs remain."""
        path = self._record_path(stage.name)
        try:
            rec = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if rec.get("fingerprint") != fingerprint:
            return None
        if any("://" not in p and not os.path.exists(p) for p in rec.get("paths", [])):
            return None
        return rec

    def _run_one(self, stage: Stage, later: Sequence[Stage]) -> None:
        from mtrec_dist.training.checkpoint import config_hash

        inputs = self._inputs(stage)
        fingerprint = config_hash(json.loads(json.dumps(inputs, default=_jsonable)))
        self.fingerprints[stage.name] = fingerprint
        rec = None if self._live else self._done_record(stage, fingerprint)
        if rec is not None:
            self.outputs[stage.name] = rec["outputs"]
            self.skipped.append(stage.name)
            self.ctx.line(f"{stage.name}: done by an earlier run in {rec.get('seconds')}s (finished "
                          f"{rec.get('finished_at')}), skipped")
            return
        if not self._live:
            if self.resume:
                self.ctx.line(f"resuming at {stage.name}")
            for s in later:  # this stage and every later one are redone: their old records are void now
                self._record_path(s.name).unlink(missing_ok=True)
        self._live = True
        started, t0 = now_utc(), time.time()  # one line per stage, when it is done: its own lines say what it does
        out = stage.run(self.outputs)
        seconds = round(time.time() - t0, 1)
        self.outputs[stage.name] = out
        self.timings[stage.name] = seconds
        self._write_record(stage, fingerprint, inputs, out, started, seconds)
        self.ctx.line(f"{stage.name} done in {seconds}s{stage.note()}")

    def _write_record(self, stage: Stage, fingerprint: str, inputs: Dict[str, Any], out: Outputs, started: str,
                      seconds: float) -> None:
        """Atomically (tmp + rename): a record exists only for a stage that finished."""
        self.records.mkdir(parents=True, exist_ok=True)
        rec = {"stage": stage.name, "fingerprint": fingerprint, "inputs": inputs, "outputs": out,
               "paths": [str(p) for p in stage.paths(out)], "started_at": started, "finished_at": now_utc(),
               "seconds": seconds}
        path = self._record_path(stage.name)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(rec, indent=1, default=_jsonable))
        os.replace(tmp, path)


# ---- config sections a stage reads (what its fingerprint hashes) ---------------------------------------


def _sampler_counts(section) -> Dict[str, Any]:
    """What a stage's fingerprint adds where its popularity negative sampler draws: the rows its item counts come
    from (the training users' since session 25, the vocabulary's over every user before), so that a resumed run
    trained with the older counts is trained again.  Nothing for the uniform sampler: fingerprints unchanged."""
    return {"popularity_counts": "training users' rows"} if samples_by_popularity(section) else {}


def config_sections(cfg: PipelineConfig, *names: str) -> Dict[str, Any]:
    """``{name: section as a dict}``; ``train:reward``/``train:rec`` = the stage's effective train settings;
    ``section.key`` = one value of a section.
    Console switches (``prepare.progress``, ``prepare.overwrite``), how the ablation's units are run
    (``ablation.parallel``: the same records either way), the real-logs tilt row's settings and
    ``train.driver_read_mb`` outside the training stages (there it changes how rows reach the workers; in
    score-rewards only which process scores) do not change a stage's result."""
    out: Dict[str, Any] = {}
    for name in names:
        if name.startswith("train:"):
            out[name] = dataclasses.asdict(cfg.stage_train(name.split(":", 1)[1]))
        elif "." in name:
            section, key = name.split(".", 1)
            out[name] = getattr(getattr(cfg, section), key)
        else:
            value = getattr(cfg, name)
            out[name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    if "prepare" in out:
        for k in ("progress", "overwrite"):
            out["prepare"].pop(k, None)
    if "ablation" in out:  # the tilt row's settings: real logs only (`mtrec ablate`), never a pipeline stage
        for k in ("parallel", "tilt_strengths", "validation_user_share"):
            out["ablation"].pop(k, None)
    if "train" in out:  # train.driver_read_mb: see the docstring
        out["train"].pop("driver_read_mb", None)
    return out


def whole_config(cfg: PipelineConfig, *drop: str) -> Dict[str, Any]:
    """Every section but where the run lives (``run_dir``, ``ray_address``) and ``drop``."""
    names = [f.name for f in dataclasses.fields(cfg) if f.name not in ("run_dir", "ray_address", *drop)]
    return config_sections(cfg, *names)


def input_files(uri: str, fmt: str, impressions: str = "") -> list:
    """``[[path, size, mtime_ns], ...]`` of prepare's input files, the impressions it reads
    (``prepare.impressions``) included: a changed or touched file reruns prepare."""
    from mtrec_dist.data import readers as rd
    from mtrec_dist.data.slates import find_impressions

    fs, files = rd.list_input_files(uri, fmt)
    listed = [(fs, files)]
    imp = find_impressions(impressions, uri)
    if imp is not None:
        listed.append((imp.fs, imp.files))
    return [[f.display, f.size, i.mtime_ns] for fs, fl in listed
            for f, i in zip(fl, fs.get_file_info([f.path for f in fl]))]


# ---- stages --------------------------------------------------------------------------------------------


def prepare_stage(ctx: RunContext, input_uri: str, output: str, *, inputs: Sequence[str] = (),
                  prepare_cfg=None, setup: Optional[Callable[[], Dict[str, Any]]] = None) -> Stage:
    """``prepare``: raw logs -> ``output``.  ``setup()`` (run inside the stage) returns extra keyword
    arguments of :func:`prepare_dataset` (retrain: the previous vocab, carry-over and row-id offset)."""
    cfg = ctx.cfg
    pcfg = prepare_cfg or cfg.prepare

    def run(done: Dict[str, Outputs]) -> Outputs:
        from mtrec_dist.data.prepare import prepare_dataset
        from mtrec_dist.data.summaries import manifest_line

        prep = dataclasses.replace(pcfg, overwrite=True, progress=pcfg.progress and ctx.progress)
        kwargs = setup() if setup else {}
        manifest = prepare_dataset(prep, input_uri, output, **kwargs)
        ctx.line(manifest_line(manifest))
        return {"prepared": output, "manifest": manifest, "setup": kwargs}

    sections = config_sections(dataclasses.replace(cfg, prepare=pcfg), "source", "prepare")
    return Stage("prepare", run, config=sections, inputs=inputs,
                 files=lambda: input_files(input_uri, pcfg.format, pcfg.impressions),
                 paths=lambda out: [out["prepared"]])


def rec_variants(cfg: PipelineConfig) -> List[Tuple[str, str]]:
    """Every (backbone, guidance) the run trains, in order."""
    return [(b, g) for b in cfg.rec.backbones for g in cfg.rec.guidances]


def rec_stage_name(backbone: str, guidance: str) -> str:
    return f"train-rec {backbone}/{guidance}"


def model_stages(ctx: RunContext, prepared: str, *, after: Sequence[str] = ("prepare",),
                 warm: Optional[WarmRule] = None, always_score: bool = True,
                 reward_history: Sequence[str] = ()) -> List[Stage]:
    """train-reward -> score-rewards -> train-rec for every backbone x guidance.

    ``warm``: how retrain picks each model's warm start (none: cold, as the pipeline trains).
    ``always_score``: False skips scoring when no recommender is guided (retrain: then they train on the
    prepared transitions directly).  ``reward_history``: earlier days' prepared data the reward model also
    trains on, for their completed return labels (retrain)."""
    cfg, layout = ctx.cfg, ctx.layout
    stages = [_train_reward_stage(ctx, prepared, after, warm, reward_history)]
    guided = any(g != CLICK_TRAINED for g in cfg.rec.guidances)
    if always_score or guided:
        stages.append(_score_stage(ctx, prepared, after))
        scored, rec_inputs = layout.rewards, [*after, "score-rewards"]
    else:
        from mtrec_dist.data.prepare import TRANSITIONS_DIR

        scored, rec_inputs = str(Path(prepared) / TRANSITIONS_DIR), [*after, "train-reward"]
    together = _RecRun(ctx, prepared, scored, warm)
    stages += [_train_rec_stage(ctx, together, b, g, rec_inputs) for b, g in rec_variants(cfg)]
    return stages


def _train_reward_stage(ctx: RunContext, prepared: str, after: Sequence[str], warm: Optional[WarmRule],
                        history: Sequence[str] = ()) -> Stage:
    cfg, layout = ctx.cfg, ctx.layout

    def run(done: Dict[str, Outputs]) -> Outputs:
        from mtrec_dist.training.reward import load_training_manifest, model_spec, train_reward_model

        ws = why = None
        if warm is not None:
            ws, why = warm("reward", model_spec(cfg, load_training_manifest(prepared)))
            ctx.line(f"reward model: {why}")
        if history:
            ctx.line(f"reward model: also the {len(history)} previous day(s), for the return labels this day completes")
        out = train_reward_model(cfg, prepared, layout.reward, progress=ctx.progress, warm_start=ws,
                                 earlier_prepared=history)
        return out if warm is None else {**out, "warm_start": ws, "warm_start_reason": why}

    # eval.heldout_user_share: which users' rows the stage trains on
    sections = config_sections(cfg, "model", "reward", "train:reward", "eval.heldout_user_share")
    return Stage("train-reward", run, config={**sections, **_sampler_counts(cfg.reward)},
                 inputs=after, paths=lambda out: [out["checkpoint_path"]])


def _score_stage(ctx: RunContext, prepared: str, after: Sequence[str]) -> Stage:
    cfg, layout = ctx.cfg, ctx.layout

    def run(done: Dict[str, Outputs]) -> Outputs:
        from mtrec_dist.training.scoring import score_rewards

        out = score_rewards(cfg, done["train-reward"]["checkpoint_path"], prepared, layout.rewards, overwrite=True)
        ctx.line(f"scored {out['rows']:,} transitions ({out['rows_per_s']:,} rows/s)")
        return out

    return Stage("score-rewards", run, config=config_sections(cfg, "train"), inputs=[*after, "train-reward"],
                 paths=lambda out: [layout.rewards])


class _RecRun:
    """The train-rec stages of a run train in one Ray Train run (``train_recommenders``: one worker group's
    start-up and one read of the rows for every recommender).  The first of them that runs trains itself and
    every later one (the runner runs every stage after the first that runs); the later stages hand back what it
    trained, so each keeps its own record, fingerprint and resume.  With ``train.checkpoints_to_keep`` set,
    each trains alone: Ray Train would delete an earlier recommender's final checkpoint.  When the run fails, the
    recommenders that had finished still hand back their outputs (their stages are recorded, so ``--resume`` does
    not train them again) and the first that had not raises the failure."""

    def __init__(self, ctx: RunContext, prepared: str, scored: str, warm: Optional[WarmRule]) -> None:
        self.ctx, self.prepared, self.scored, self.warm = ctx, prepared, scored, warm
        self.trained: Dict[Tuple[str, str], Outputs] = {}
        self.failed: Optional[Exception] = None
        self.trained_in: Dict[Tuple[str, str], Tuple[str, int]] = {}  # variant -> (stage that trained it, run size)

    def output(self, backbone: str, guidance: str) -> Outputs:
        """The recommender's outputs, training it and the variants after it first if they are not trained."""
        key = (backbone, guidance)
        if key not in self.trained and self.failed is None:
            variants = rec_variants(self.ctx.cfg)
            rest = variants[variants.index(key):]
            together = not self.ctx.cfg.stage_train("rec").checkpoints_to_keep
            for group in ([rest] if together else [[v] for v in rest]):
                self._train(group)
        if key not in self.trained:
            raise self.failed
        return self.trained.pop(key)

    def note(self, backbone: str, guidance: str) -> str:
        """What the variant's "done" line adds: the run it trained in, when that run trained several."""
        first, size = self.trained_in.get((backbone, guidance), ("", 1))
        if size == 1:
            return ""
        if first == rec_stage_name(backbone, guidance):
            return f" (all {size} in one run)"
        return f" (trained in {first}'s run)"

    def _train(self, variants: List[Tuple[str, str]]) -> None:
        from mtrec_dist.training.loop import JobsFailed
        from mtrec_dist.training.recommender import RecJob, rec_model_spec, train_recommenders
        from mtrec_dist.training.reward import load_training_manifest

        cfg, layout = self.ctx.cfg, self.ctx.layout
        manifest = load_training_manifest(self.prepared) if self.warm is not None else None
        jobs, reasons = [], []
        for b, g in variants:
            ws = why = None
            if self.warm is not None:
                ws, why = self.warm(rec_name(b, g), rec_model_spec(cfg, manifest, b, g))
                self.ctx.line(f"recommender {rec_name(b, g)}: {why}")
            jobs.append(RecJob(b, g, layout.rec(b, g), ws))
            reasons.append(why)
        if len(jobs) > 1:
            self.ctx.line(f"train-rec: {len(jobs)} recommenders, one after another in one Ray Train run")
        try:
            outs = train_recommenders(cfg, self.scored, self.prepared, jobs, progress=self.ctx.progress,
                                      storage=layout.rec_runs)
        except JobsFailed as failed:
            outs, self.failed = failed.finished, failed
        self.trained_in.update({v: (rec_stage_name(*variants[0]), len(variants)) for v in variants})
        for job, why, out in zip(jobs, reasons, outs):
            out = out if self.warm is None else {**out, "warm_start": job.warm_start, "warm_start_reason": why}
            self.trained[(job.backbone, job.guidance)] = out


def _train_rec_stage(ctx: RunContext, together: _RecRun, backbone: str, guidance: str,
                     inputs: Sequence[str]) -> Stage:
    cfg = ctx.cfg

    def run(done: Dict[str, Outputs]) -> Outputs:
        return together.output(backbone, guidance)

    rec = dataclasses.replace(cfg.rec, backbone=backbone, guidance=guidance)
    sections = config_sections(dataclasses.replace(cfg, rec=rec), "model", "rec", "train:rec",
                               "eval.heldout_user_share")  # which users' rows the stage trains on
    return Stage(rec_stage_name(backbone, guidance), run, config={**sections, **_sampler_counts(rec)}, inputs=inputs,
                 paths=lambda out: [out["checkpoint_path"]], note=lambda: together.note(backbone, guidance))
