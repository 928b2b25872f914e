"""Malicious or damaged checkpoints are refused with a clear error, and nothing in them runs.

Every attack goes through the project's public load functions, the ones behind each entry point:
``load_checkpoint`` (``--resume`` and Ray restore), ``warm_start_module`` (retrain warm start),
``load_unsharded_model`` (scoring, evaluation, offline policies) and ``checkpoint_tensor_shapes``.
The checkpoint is a real one (``save_checkpoint`` of a TrainingModule and a TorchRec keyed Adam, in one
process: no Ray, no process group).  Each pickle payload is first shown to work against a plain unpickler,
so a refusal proves the guard, not a broken payload.
"""
from __future__ import annotations

import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.optim.keyed import KeyedOptimizerWrapper

from helpers_training import tiny_factory
from mtrec_dist.training.checkpoint import (
    CheckpointError,
    SafeFileSystemReader,
    UnsafeCheckpointError,
    checkpoint_tensor_shapes,
    load_checkpoint,
    load_unsharded_model,
    save_checkpoint,
    warm_start_module,
)
from mtrec_dist.training.sharding import TrainingModule

NUM_ITEMS, DIM = 40, 8
TABLE = "model.item_embedding.ec.embeddings.item_table.weight"
SHARD = "__0_0.distcp"


def _module(num_items: int = NUM_ITEMS, dim: int = DIM, seed: int = 0):
    torch.manual_seed(seed)
    module = TrainingModule(tiny_factory(num_items, dim, torch.device("cpu")))
    opt = KeyedOptimizerWrapper(dict(module.named_parameters()), lambda p: torch.optim.Adam(p, lr=0.01))
    opt.init_state()
    return module, opt


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("good") / "ckpt"
    module, opt = _module()
    save_checkpoint(str(d), module, opt, rank=0, meta={"step": 1, "epoch": 0, "rows_seen": 0, "world_size": 1},
                    consumed_row_ids=np.zeros(0))
    return d


def _copy(good: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "ckpt"))


def _resume(path):
    return load_checkpoint(str(path), *_module(seed=1))


def _warm_start(path):
    return warm_start_module(_module(seed=1)[0], str(path))


def _score(path):
    return load_unsharded_model(lambda device: tiny_factory(NUM_ITEMS, DIM, device), str(path))


def _shapes(path):
    return checkpoint_tensor_shapes(str(path))


LOADERS = pytest.mark.parametrize("load", [_resume, _warm_start, _score, _shapes],
                                  ids=["resume", "warm_start", "score", "shapes"])


# ---- hand-assembled protocol-4 pickles (pickletools opcodes) ----

def _str(text: str) -> bytes:  # BINUNICODE
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _global(module: str, name: str) -> bytes:  # STACK_GLOBAL: with protocol 4 a dotted name is walked
    return _str(module) + _str(name) + b"\x93"


def _call(fn: bytes, *args: bytes) -> bytes:  # fn(*args): MARK args TUPLE REDUCE
    return fn + b"(" + b"".join(args) + b"tR"


def _pickle(body: bytes) -> bytes:
    return b"\x80\x04" + body + b"."


class _Reduce:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(target: Path) -> dict:
    """Pickles that each create the directory ``target`` when unpickled without a guard."""
    t = str(target)
    dcp_meta = "torch.distributed.checkpoint.metadata"  # an allowed module that imports os and torch
    getattr_os_mkdir = _call(_global("builtins", "getattr"),
                             _call(_global("builtins", "__import__"), _str("os")), _str("mkdir"))
    return {
        "reduce_os_mkdir": pickle.dumps(_Reduce(os.mkdir, t)),
        "reduce_os_system": pickle.dumps(_Reduce(os.system, f"mkdir '{t}'")),
        "dotted_metadata_os_mkdir": _pickle(_call(_global(dcp_meta, "os.mkdir"), _str(t))),
        "module_attribute_torch_walk": _pickle(_call(_global(dcp_meta, "torch.os.mkdir"), _str(t))),
        "dotted_torch_walk": _pickle(_call(_global("torch", "serialization.os.mkdir"), _str(t))),  # torch.Size is allowed
        "builtins_eval": _pickle(_call(_global("builtins", "eval"), _str(f"__import__('os').mkdir({t!r})"))),
        "builtins_getattr": _pickle(_call(getattr_os_mkdir, _str(t))),
    }


PAYLOADS = sorted(_payloads(Path("x")))


@pytest.mark.parametrize("name", PAYLOADS)
def test_payloads_are_real(name, tmp_path):
    """Without the guard each payload does run (so the refusals below are the guard's work)."""
    target = tmp_path / "pwned"
    pickle.loads(_payloads(target)[name])
    assert target.is_dir()


@LOADERS
@pytest.mark.parametrize("name", PAYLOADS)
def test_malicious_metadata_is_refused_and_nothing_runs(name, load, good, tmp_path):
    ckpt, target = _copy(good, tmp_path), tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(_payloads(target)[name])
    with pytest.raises(UnsafeCheckpointError) as err:
        load(ckpt)
    assert str(ckpt) in str(err.value) and "refusing" in str(err.value)
    assert not target.exists()


@pytest.mark.parametrize("module,name", [
    ("torch.distributed.checkpoint.metadata", "os.system"),
    ("torch.distributed.checkpoint.metadata", "os"),
    ("torch.distributed.checkpoint.metadata", "torch"),
    ("torch", "load"),
    ("torch", "Size.__new__"),
    ("torch.distributed.checkpoint.metadata", "Metadata.__init__.__globals__"),
    ("pathlib", "os.mkdir"),
    ("builtins", "eval"),
    ("builtins", "getattr"),
    ("posix", "system"),
])
def test_refusal_names_the_global(module, name, tmp_path):
    (tmp_path / ".metadata").write_bytes(_pickle(_global(module, name)))
    with pytest.raises(UnsafeCheckpointError, match=f"'{module}' '{name}'"):
        SafeFileSystemReader(str(tmp_path)).read_metadata()


def test_the_real_checkpoint_loads(good):
    """The guards refuse nothing a real checkpoint holds: each entry point loads it."""
    for load in (_resume, _warm_start, _score, _shapes):
        load(good)
    reference = _module(seed=0)[0].state_dict()
    for key, value in _score(good).state_dict().items():
        assert torch.equal(value, reference[f"model.{key}"]), key


# ---- damaged checkpoints ----

def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@LOADERS
def test_truncated_metadata_is_refused(load, good, tmp_path):
    ckpt = _copy(good, tmp_path)
    _truncate(ckpt / ".metadata", 0.5)
    with pytest.raises(CheckpointError, match="cannot read .metadata"):
        load(ckpt)


@LOADERS
def test_truncated_shard_is_refused(load, good, tmp_path):
    ckpt = _copy(good, tmp_path)
    _truncate(ckpt / SHARD, 0.9)
    with pytest.raises(CheckpointError, match=f"{SHARD} has .* bytes .*cut short"):
        load(ckpt)


@pytest.mark.parametrize("load", [_resume, _warm_start, _score], ids=["resume", "warm_start", "score"])
def test_garbled_shard_is_refused(load, good, tmp_path):
    ckpt = _copy(good, tmp_path)
    shard = ckpt / SHARD
    shard.write_bytes(b"\0" * shard.stat().st_size)  # same length, no tensor data left
    with pytest.raises(CheckpointError, match="DCP could not load it"):
        load(ckpt)


def _edit_metadata(ckpt: Path, edit) -> None:
    """Re-pickle the checkpoint's metadata after ``edit(metadata)`` (only allowed classes: the loader's
    structural checks are what is exercised)."""
    metadata = SafeFileSystemReader(str(ckpt)).read_metadata()
    metadata.storage_meta = None
    edit(metadata)
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))


def test_shard_path_outside_the_checkpoint_is_refused(good, tmp_path):
    ckpt = _copy(good, tmp_path)
    (tmp_path / "outside").write_bytes((ckpt / SHARD).read_bytes())

    def escape(md):
        for info in md.storage_data.values():
            info.relative_path = "../outside"

    _edit_metadata(ckpt, escape)
    with pytest.raises(CheckpointError, match="not a file inside the checkpoint"):
        _score(ckpt)


def test_oversized_tensor_in_metadata_is_refused_before_allocation(good, tmp_path):
    """Metadata declaring a table of 10^12 rows: refused against the model's shape, never allocated."""
    ckpt = _copy(good, tmp_path)
    _edit_metadata(ckpt, lambda md: setattr(md.state_dict_metadata[f"model.{TABLE}"], "size",
                                            torch.Size([10 ** 12, DIM])))
    for load in (_resume, _score):
        with pytest.raises(CheckpointError, match=r"does not match the model: model\.model\.item_embedding.*"
                                                  r"\[1000000000000, 8\] there, \[41, 8\] in the model"):
            load(ckpt)
    with pytest.raises(ValueError, match="only growth along dim 0"):  # warm start: a smaller model is refused
        _warm_start(ckpt)


def test_chunk_outside_its_tensor_is_refused(good, tmp_path):
    ckpt = _copy(good, tmp_path)
    _edit_metadata(ckpt, lambda md: setattr(md.state_dict_metadata[f"model.{TABLE}"].chunks[0], "sizes",
                                            torch.Size([10 ** 9, DIM])))
    with pytest.raises(CheckpointError, match="lies outside its shape"):
        _score(ckpt)


def test_metadata_field_of_the_wrong_type_is_refused(good, tmp_path):
    ckpt = _copy(good, tmp_path)
    _edit_metadata(ckpt, lambda md: setattr(md.state_dict_metadata[f"model.{TABLE}"], "size", 41))
    with pytest.raises(CheckpointError, match="cannot read .metadata"):
        _score(ckpt)


def test_checkpoint_of_another_model_is_refused(good, tmp_path):
    """Another catalog size or embedding dim (a wrong model spec) fails with the keys and shapes, before
    DCP reads anything; missing keys are named too."""
    with pytest.raises(CheckpointError, match=r"does not match the model: .*\[41, 8\] there, \[61, 8\] in the model"):
        load_unsharded_model(lambda device: tiny_factory(60, DIM, device), str(good))
    with pytest.raises(CheckpointError, match=r"\[41, 8\] there, \[41, 16\] in the model"):
        load_checkpoint(str(good), *_module(dim=16))
    ckpt = _copy(good, tmp_path)
    _edit_metadata(ckpt, lambda md: md.state_dict_metadata.pop("model.model.proj.bias"))
    with pytest.raises(CheckpointError, match="model.model.proj.bias missing"):
        _score(ckpt)


def test_metadata_that_is_not_dcp_metadata_is_refused(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": {}}))
    with pytest.raises(CheckpointError, match="not DCP checkpoint metadata"):
        SafeFileSystemReader(str(tmp_path)).read_metadata()
