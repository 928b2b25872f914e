"""The run folder is named in one place (mtrec_dist/layout.py): no other module spells its folder names as paths."""
from __future__ import annotations

import ast
from pathlib import Path

from mtrec_dist import layout
from mtrec_dist.layout import RunLayout, prepare_paths

PACKAGE = Path(__file__).resolve().parents[1] / "mtrec_dist"
# Folder and file names of the run folder.  Names that are also config keys ("reward", "rec", "eval") are
# flagged only where they are used as a path part; the unambiguous file names anywhere.
FOLDERS = {layout.SIM, layout.PREPARED, layout.REWARD, layout.REWARDS, layout.REC, layout.REPORT, layout.ABLATION,
           layout.STAGES, layout.CARRY, layout.CARRY_PREVIOUS, layout.RETRAIN_ROOT}
FILES = {layout.PIPELINE_FILE, layout.CONFIG_FILE, layout.RETRAIN_FILE, layout.VERSIONS_FILE}
PATH_CALLS = {"join", "join_path", "Path", "PurePath", "glob", "with_name"}


def _call_name(node: ast.Call) -> str:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")


def _path_parts(tree: ast.AST):
    """(line, text) of every string constant used as a path part: an argument of os.path.join / join_path /
    Path(...), an operand of ``/``, or a piece of an f-string/str with a slash around a run-folder name."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _call_name(node) in PATH_CALLS:
            for a in node.args:
                if isinstance(a, ast.Constant) and isinstance(a.value, str):
                    yield a.lineno, a.value
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            for a in (node.left, node.right):
                if isinstance(a, ast.Constant) and isinstance(a.value, str):
                    yield a.lineno, a.value
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "/" in node.value \
                and "\n" not in node.value and " " not in node.value:
            yield node.lineno, node.value


def _hits(path: Path):
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for line, text in _path_parts(tree):
        parts = [p for p in text.replace("<run_dir>", "").split("/") if p]
        if any(p in FOLDERS or p in FILES for p in parts):
            yield f"{path.relative_to(PACKAGE.parent)}:{line}: {text!r}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in FILES and id(node) not in docstrings:
            yield f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.value!r}"


def test_run_folder_names_are_defined_once():
    hits = sorted({h for p in PACKAGE.rglob("*.py") if p.name != "layout.py" for h in _hits(p)})
    assert not hits, "run-folder paths spelled outside mtrec_dist/layout.py (use RunLayout):\n" + "\n".join(hits)


def test_the_scan_catches_a_hand_written_path(tmp_path):
    bad = PACKAGE / "_layout_scan_probe.py"
    try:
        bad.write_text('import os\nP = os.path.join("runs", "rewards")\nQ = "x/prepared/y"\n')
        assert len(list(_hits(bad))) == 2
    finally:
        bad.unlink()


def test_layout_paths():
    lay = RunLayout("/runs/x/")
    assert lay.rewards == "/runs/x/rewards" and lay.reward == "/runs/x/reward"
    assert lay.rec("sasrec", "none") == "/runs/x/rec/sasrec-none"
    assert lay.sim_logs == "/runs/x/sim/logs" and lay.pipeline_json == "/runs/x/pipeline.json"
    assert RunLayout("s3://b/run").prepared == "s3://b/run/prepared"
    assert RunLayout("runs/x").stages == "runs/x/stages"


def test_prepare_paths_default_to_the_run_folder():
    from mtrec_dist.config import PipelineConfig

    cfg = PipelineConfig(run_dir="runs/t")
    assert prepare_paths(cfg) == ("runs/t/sim/logs", "runs/t/prepared")
    cfg.prepare.input, cfg.prepare.output = "logs/", "out/"
    assert prepare_paths(cfg) == ("logs/", "out/")


def test_an_unguided_recommender_without_scores_reads_the_prepared_transitions(tmp_path):
    from mtrec_dist.commands.train_rec import default_scores

    rewards, prepared = str(tmp_path / "rewards"), str(tmp_path / "prepared")
    assert default_scores(rewards, prepared, "none") == f"{prepared}/transitions"
    assert default_scores(rewards, prepared, "reweight") == rewards  # a guided one needs the scores: its error
    (tmp_path / "rewards").mkdir()
    assert default_scores(rewards, prepared, "none") == rewards


def test_a_missing_file_error_says_what_is_missing(capsys, monkeypatch):
    from mtrec_dist import cli
    from mtrec_dist.commands import inspect

    def missing(args):
        raise FileNotFoundError("/data/run/rewards")

    monkeypatch.setattr(inspect, "run", missing)
    assert cli.main(["inspect", "x"]) == 1
    assert capsys.readouterr().err.strip() == "mtrec inspect: error: no such file or directory: /data/run/rewards"
