"""Wrapping a model in TorchRec ``DistributedModelParallel``: planner, sharders, fused sparse optimizer.

The model is built on the ``meta`` device so that no rank ever holds the whole item table: DMP materialises
only this rank's shard.  Dense (non-TorchRec) submodules are materialised here first, post-order, by
``reset_parameters()`` (or torch's ``_reset_parameters()``, e.g. ``nn.MultiheadAttention``); a module that
owns meta tensors but no reset method is refused with its name, because DMP would leave it uninitialised.
After that, a model may define ``after_materialize()`` (e.g. to copy its online critic into a target
critic); it is called once, before sharding.

The planner chooses the sharding type and kernel from the topology; ``train.sharding`` other than
``auto`` constrains the sharding type.  On CPU only the FUSED kernel with ROW_WISE / TABLE_WISE /
COLUMN_WISE works (stack notes: DENSE and DATA_PARALLEL fail on gloo), so on CPU the choice is restricted
to those.

Capacity planning (:mod:`mtrec_dist.planning`, `mtrec plan`) builds its sharders, constraints and topology
with the functions here (:func:`make_sharders`, :func:`make_constraints`, :func:`make_topology`), so the
plan it reports for a training configuration is the plan training gets (tests/test_plan.py checks it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from mtrec_dist.config import TrainConfig

# Sharding types that run on CPU with the FUSED kernel.
CPU_SHARDING_TYPES = ("row_wise", "table_wise", "column_wise")


class TrainingModule(nn.Module):
    """``forward(batch) = model.losses(batch)``.

    DMP/DDP synchronise dense gradients only through ``forward``; calling ``model.losses`` directly would
    bypass DDP's reducer.  The wrapped model sits under the attribute ``model``, so every key in the DMP
    state dict is ``"model." + <key of the plain model>``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not callable(getattr(model, "losses", None)):
            raise TypeError(f"{type(model).__name__} has no losses(batch) method; the training harness needs one")
        self.model = model

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return self.model.losses(batch)


MODEL_PREFIX = "model."


def _torchrec_module_types() -> tuple:
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    return (EmbeddingCollection, EmbeddingBagCollection)


def materialize_dense(model: nn.Module, device: torch.device) -> List[str]:
    """Allocate and initialise, on ``device``, every meta tensor outside the TorchRec embedding modules.

    Returns the names of the modules it initialised.  Raises ``TypeError`` naming a module that owns meta
    tensors but has no ``reset_parameters``/``_reset_parameters``.
    """
    ec_types = _torchrec_module_types()
    skip_prefixes: List[str] = []
    modules = []
    for name, module in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in skip_prefixes):
            continue
        if isinstance(module, ec_types):
            skip_prefixes.append(name)
            continue
        modules.append((name, module))
    done = []
    # Children before parents: a parent's reset may re-initialise its children's tensors (e.g.
    # MultiheadAttention zeroes out_proj.bias), and running it last matches eager construction.
    for name, module in reversed(modules):
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if not any(t is not None and t.device.type == "meta" for _, t in own):
            continue
        reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
        if reset is None:
            metas = [n for n, t in own if t is not None and t.device.type == "meta"]
            raise TypeError(
                f"module {name or '<root>'} ({type(module).__name__}) holds meta tensor(s) {metas} but has no "
                "reset_parameters(); give it one so the model can be built on the meta device for sharding")
        module.to_empty(device=device, recurse=False)
        with torch.no_grad():
            reset()
        done.append(name)
    hook = getattr(model, "after_materialize", None)
    if callable(hook):
        with torch.no_grad():
            hook()
    return done


def embedding_tables(model: nn.Module) -> List[str]:
    """Names of the tables of every TorchRec embedding module in ``model``."""
    names = []
    for module in model.modules():
        if isinstance(module, _torchrec_module_types()):
            names.extend(cfg.name for cfg in module.embedding_configs())
    return names


def make_sharders(train_cfg: TrainConfig) -> list:
    """EmbeddingCollection/EmbeddingBagCollection sharders with the FBGEMM fused sparse optimizer."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    fused_params = {
        "optimizer": EmbOptimType[train_cfg.sparse_optimizer.upper()],
        "learning_rate": train_cfg.sparse_lr,
    }
    if train_cfg.sparse_optimizer != "exact_sgd":
        fused_params["eps"] = 1e-8
    return [EmbeddingCollectionSharder(fused_params=dict(fused_params)),
            EmbeddingBagCollectionSharder(fused_params=dict(fused_params))]


def make_constraints(tables: List[str], train_cfg: TrainConfig, device: torch.device,
                     pooling_factor: Optional[float] = None) -> dict:
    """ParameterConstraints per table: the configured sharding type; on CPU the FUSED kernel.

    ``pooling_factor`` (ids looked up per sample) is a workload hint for the planner's cost model; capacity
    planning passes it, training leaves TorchRec's default."""
    from torchrec.distributed.planner.types import ParameterConstraints

    if train_cfg.sharding != "auto":
        types = [train_cfg.sharding]
    elif device.type == "cpu":
        types = list(CPU_SHARDING_TYPES)
    else:
        types = None
    kernels = ["fused"] if device.type == "cpu" else None
    if types is None and pooling_factor is None:
        return {}
    hint = {} if pooling_factor is None else {"pooling_factors": [float(pooling_factor)]}
    return {t: ParameterConstraints(sharding_types=types, compute_kernels=kernels, **hint) for t in tables}


def make_topology(world_size: int, local_world_size: int, device: torch.device, *,
                  hbm_bytes: Optional[int] = None, ddr_bytes: Optional[int] = None):
    """TorchRec's Topology of the ranks; with ``hbm_bytes``/``ddr_bytes`` per rank a dry run (capacity
    planning for machines we do not have), else what TorchRec detects."""
    from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig

    dry = {} if hbm_bytes is None and ddr_bytes is None else {
        "is_dry_run": True, "dry_run_hbm_bytes": int(hbm_bytes or 0), "dry_run_ddr_bytes": int(ddr_bytes or 0)}
    return TopologyFactory.create_topology(
        TrainerConfig(world_size=world_size, local_world_size=local_world_size, **dry),
        kernel_config=KernelConfig(compute_device=device.type),
    )


@dataclass
class ShardedModel:
    dmp: nn.Module          # DistributedModelParallel(TrainingModule(model))
    optimizer: object       # CombinedOptimizer (fused sparse + keyed dense)
    plan: object            # ShardingPlan
    model: nn.Module        # the unwrapped model (its embedding modules are sharded in place)

    def call_hook(self, name: str) -> None:
        hook = getattr(self.model, name, None)
        if callable(hook):
            with torch.no_grad():
                hook()


def shard_model(model: nn.Module, train_cfg: TrainConfig, device: torch.device, world_size: int,
                local_world_size: int, pg=None) -> ShardedModel:
    """Plan (collectively), shard and wrap ``model`` (built on meta) in DMP; build the combined optimizer.

    Must be called by every rank of the default process group.
    """
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel

    module, plan, sharders = plan_model(model, train_cfg, device, world_size, local_world_size,
                                        pg=pg or dist.GroupMember.WORLD)
    group_size = dist.get_world_size(pg or dist.GroupMember.WORLD)  # the group's, not what the caller said
    dmp = DistributedModelParallel(module, device=device, plan=plan, sharders=sharders,
                                   data_parallel_wrapper=_dense_wrapper(group_size))
    return ShardedModel(dmp=dmp, optimizer=build_optimizer(dmp, train_cfg), plan=plan, model=dmp.module.model)


def _dense_wrapper(world_size: int):
    """TorchRec's default (DDP over the dense parameters), or none for a single rank: there DDP's all-reduce
    sums one gradient and its forward and backward hooks cost about 1.5 ms of a 25 ms SASRec step
    (bench/RESULTS.md, sessions 10 and 14)."""
    from torchrec.distributed.model_parallel import DataParallelWrapper, DefaultDataParallelWrapper

    class SingleRank(DataParallelWrapper):
        def wrap(self, dmp, env, device) -> None:  # the dense parameters stay as they are, on ``device``
            return None

    return SingleRank() if world_size == 1 else DefaultDataParallelWrapper()


def plan_model(model: nn.Module, train_cfg: TrainConfig, device: torch.device, world_size: int,
               local_world_size: int, pg=None) -> tuple:
    """``(TrainingModule(model), ShardingPlan, sharders)``: what training hands to DMP.

    With a process group every rank plans together (``collective_plan``: rank 0 plans, the others receive
    it); without one the same planner runs in this process alone, which gives the same plan and lets
    tests compare it with `mtrec plan` without starting Ray."""
    materialize_dense(model, device)
    module = TrainingModule(model)
    tables = embedding_tables(model)
    if not tables:
        raise ValueError(f"{type(model).__name__} has no TorchRec embedding table to shard")
    sharders = make_sharders(train_cfg)
    planner = make_planner(tables, train_cfg, device, make_topology(world_size, local_world_size, device))
    try:
        plan = planner.collective_plan(module, sharders, pg) if pg is not None else planner.plan(module, sharders)
    except Exception as e:
        raise RuntimeError(f"sharding planner failed for tables {tables} with train.sharding="
                           f"{train_cfg.sharding!r} on {device.type}: {e}") from e
    return module, plan, sharders


def make_planner(tables: List[str], train_cfg: TrainConfig, device: torch.device, topology, *,
                 pooling_factor: Optional[float] = None, **planner_kwargs):
    """TorchRec's ``EmbeddingShardingPlanner`` with this module's constraints; ``planner_kwargs`` (batch size,
    storage reservation, callbacks) are capacity planning's workload description."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner

    return EmbeddingShardingPlanner(topology=topology,
                                    constraints=make_constraints(tables, train_cfg, device, pooling_factor),
                                    **planner_kwargs)


def build_optimizer(dmp: nn.Module, train_cfg: TrainConfig):
    """``CombinedOptimizer([fused sparse optimizer, Adam over the dense parameters])``."""
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    dense_params = {n: p for n, p in in_backward_optimizer_filter(dmp.named_parameters()) if p.requires_grad}
    parts = [("sparse", dmp.fused_optimizer)]
    if dense_params:
        lr = train_cfg.lr
        parts.append(("dense", KeyedOptimizerWrapper(dense_params, lambda params: torch.optim.Adam(params, lr=lr))))
    return CombinedOptimizer(parts)


def local_shard_sizes(dmp: nn.Module) -> Dict[str, List[Tuple[int, ...]]]:
    """For each sharded weight in the DMP state dict: the shapes of the shards this rank holds."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    out: Dict[str, List[Tuple[int, ...]]] = {}
    for key, value in dmp.state_dict().items():
        if isinstance(value, ShardedTensor):
            out[key] = [tuple(s.tensor.shape) for s in value.local_shards()]
        elif hasattr(value, "to_local") and type(value).__name__ == "DTensor":
            out[key] = [tuple(value.to_local().shape)]
    return out


def plan_summary(plan) -> Dict[str, dict]:
    """``{table: {sharding_type, compute_kernel, ranks, shard_sizes}}`` of a ShardingPlan (JSON-able)."""
    summary: Dict[str, dict] = {}
    for module_plan in plan.plan.values():
        for table, ps in module_plan.items():
            shards = ps.sharding_spec.shards if ps.sharding_spec is not None else []
            summary[table] = {
                "sharding_type": ps.sharding_type,
                "compute_kernel": ps.compute_kernel,
                "ranks": list(ps.ranks or []),
                "shard_sizes": [list(s.shard_sizes) for s in shards],
            }
    return summary
