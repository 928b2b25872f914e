"""Capacity planning: run TorchRec's sharding planner for a *target* cluster without having it.

:func:`plan_capacity` builds the real :class:`~mtrec_dist.models.embeddings.ItemEmbedding` on the ``meta``
device (no memory is allocated, so a 10^9-row table costs nothing), describes the target machines with a
TorchRec ``Topology`` in dry-run mode, and calls ``EmbeddingShardingPlanner.plan`` (the single-process
planner, no process group) with the sharders, constraints and topology built by the very functions
training uses (:mod:`mtrec_dist.training.sharding`: fused-optimizer sharders, the configured sharding
type, FUSED row/table/column-wise on CPU), so the plan for a training configuration is the plan training
gets.  It returns a JSON-able dict with

* the chosen sharding type and compute kernel of the item table and where each shard lives,
* per-rank memory (HBM/DDR) from the planner's own storage estimates (weights + fused optimizer state +
  input/output buffers), next to the usable capacity,
* the estimated all-to-all bytes per training step (see :data:`ALL_TO_ALL_FORMULA`),
* the planner's own per-rank time estimate for the embedding work of one step.

:func:`format_plan` (:mod:`.planning_text`) renders that dict as a readable report.  A table that does not fit raises
:class:`CapacityError` (a ``ValueError``) with the sizes involved and what to change.

Layering: above training (it plans with training's sharding functions); imported lazily, since torch and
torchrec are slow to import and `mtrec plan --help` only needs the choices below.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# The text report lives in .planning_text (with GIB, which both use); format_plan stays importable from here.
from mtrec_dist.planning_text import GIB, format_plan  # noqa: F401

FP32_BYTES = 4
ID_BYTES = 8  # int64 ids in the KeyedJaggedTensor
LENGTH_BYTES = 4  # int32 lengths, one per sample per feature

# What EmbeddingCollectionSharder offers (TorchRec 1.8); "auto" lets the planner choose among them.
SHARDING_CHOICES = ("auto", "row_wise", "table_wise", "column_wise", "data_parallel")
DEVICE_CHOICES = ("cuda", "cpu")
OPTIMIZER_CHOICES = ("exact_rowwise_adagrad", "exact_adagrad", "exact_sgd")

ALL_TO_ALL_FORMULA = (
    "Per training step and rank p, for every shard s of the item table that lives on another rank q and "
    "holds a fraction f_s of the rows and c_s of the embedding columns: "
    "ids p->q = B * n * f_s * 8 bytes (int64) plus lengths B * F * 4 bytes (int32); "
    "embeddings q->p in the forward pass = B * n * f_s * c_s * 4 bytes (fp32); "
    "gradients p->q in the backward pass = the same B * n * f_s * c_s * 4 bytes. "
    "B = batch size per rank, n = ids looked up per sample, F = features of the table. "
    "Assumes ids spread evenly over the rows (popular items concentrate traffic on the ranks that own "
    "them). For row-wise sharding over W ranks this is about B * n * (W-1)/W * (8 + 2 * 4 * dim) bytes "
    "sent per rank. data_parallel replicas do no all-to-all; their gradients are all-reduced instead "
    "(about 2 * (W-1)/W * table bytes per rank per step, reported separately)."
)


class CapacityError(ValueError):
    """The requested table does not fit the target topology (or the request is malformed)."""


def _optimizer_class(name: str):
    import torch
    from torchrec import optim as trec_optim

    return {
        "exact_rowwise_adagrad": trec_optim.RowWiseAdagrad,  # one fp32 per row
        "exact_adagrad": torch.optim.Adagrad,  # one fp32 per weight
        "exact_sgd": torch.optim.SGD,  # no state
    }[name]


def _validate(num_items, embedding_dim, world_size, local_world_size, hbm_gb_per_rank, ddr_gb_per_rank,
              compute_device, batch_size_per_rank, ids_per_sample, sharding, sparse_optimizer, reserve_fraction):
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise CapacityError(msg)

    need(num_items >= 1, f"--items must be >= 1, got {num_items}")
    need(embedding_dim >= 1, f"--dim must be >= 1, got {embedding_dim}")
    need(world_size >= 1, f"--world-size must be >= 1, got {world_size}")
    need(1 <= local_world_size <= world_size, f"--local-world-size must be in [1, world size={world_size}], "
         f"got {local_world_size}")
    need(world_size % local_world_size == 0, f"--world-size ({world_size}) must be a multiple of "
         f"--local-world-size ({local_world_size}): every node has the same number of ranks")
    need(compute_device in DEVICE_CHOICES, f"--device must be one of {DEVICE_CHOICES}, got {compute_device!r}")
    need(hbm_gb_per_rank > 0 or compute_device == "cpu", f"--hbm-gb must be > 0 for cuda, got {hbm_gb_per_rank}")
    need(ddr_gb_per_rank > 0, f"--ddr-gb must be > 0, got {ddr_gb_per_rank}")
    need(batch_size_per_rank >= 1, f"--batch-size must be >= 1, got {batch_size_per_rank}")
    need(ids_per_sample >= 1, f"--ids-per-sample must be >= 1, got {ids_per_sample}")
    need(sharding in SHARDING_CHOICES, f"--sharding must be one of {SHARDING_CHOICES}, got {sharding!r}")
    need(sparse_optimizer in OPTIMIZER_CHOICES,
         f"sparse optimizer must be one of {OPTIMIZER_CHOICES}, got {sparse_optimizer!r}")
    need(0.0 <= reserve_fraction < 1.0, f"--reserve must be in [0, 1), got {reserve_fraction}")


@dataclass(frozen=True)
class _Memory:
    """Per-rank memory of the target in bytes: the capacity, and what the tables may use after the reserve."""

    hbm_bytes: int
    ddr_bytes: int
    hbm_usable: int
    ddr_usable: int


def _memory(compute_device: str, hbm_gb_per_rank: float, ddr_gb_per_rank: float, reserve_fraction: float) -> _Memory:
    hbm_bytes = int(hbm_gb_per_rank * GIB) if compute_device == "cuda" else 0
    ddr_bytes = int(ddr_gb_per_rank * GIB)
    if compute_device == "cpu":  # TorchRec reserves HBM only; on CPU the tables live in DDR, reserve there
        ddr_usable = int(ddr_bytes * (1.0 - reserve_fraction))
    else:
        ddr_usable = ddr_bytes
    return _Memory(hbm_bytes=hbm_bytes, ddr_bytes=ddr_bytes, hbm_usable=int(hbm_bytes * (1.0 - reserve_fraction)),
                   ddr_usable=ddr_usable)


def _check_sharding_runs(sharders: List[Any], sharding: str, compute_device: str) -> None:
    """A clear error for a sharding type TorchRec does not offer, or that training cannot run on CPU."""
    from torchrec.distributed.embedding import EmbeddingCollectionSharder

    from mtrec_dist.training.sharding import CPU_SHARDING_TYPES

    sharder = next(s for s in sharders if isinstance(s, EmbeddingCollectionSharder))
    if sharding != "auto" and sharding not in sharder.sharding_types(compute_device):
        raise CapacityError(f"--sharding {sharding} is not offered by TorchRec's EmbeddingCollectionSharder on "
                            f"{compute_device}; choose from {sharder.sharding_types(compute_device)} or auto")
    if compute_device == "cpu" and sharding not in ("auto", *CPU_SHARDING_TYPES):
        raise CapacityError(f"--sharding {sharding} does not run on CPU ranks (gloo): training there uses the FUSED "
                            f"kernel with {', '.join(CPU_SHARDING_TYPES)} only")


def _rank_usage(so: Any, world_size: int, local_world_size: int, mem: _Memory) -> Tuple[List[dict], List[dict]]:
    """The winning option's shards, and per rank their count, rows, planner storage and time, and capacity."""
    per_rank = {r: {"rank": r, "node": r // local_world_size, "hbm_bytes": 0, "ddr_bytes": 0, "shards": 0,
                    "rows": 0, "planner_ms": 0.0} for r in range(world_size)}
    shards = []
    for sh in so.shards:
        r = int(sh.rank)
        st = sh.storage
        per_rank[r]["hbm_bytes"] += int(st.hbm)
        per_rank[r]["ddr_bytes"] += int(st.ddr)
        per_rank[r]["shards"] += 1
        per_rank[r]["rows"] += int(sh.size[0])
        per_rank[r]["planner_ms"] += float(sh.perf.total) if sh.perf is not None else 0.0
        shards.append({"rank": r, "offsets": [int(x) for x in sh.offset], "sizes": [int(x) for x in sh.size],
                       "hbm_bytes": int(st.hbm), "ddr_bytes": int(st.ddr)})
    ranks = []
    for r in range(world_size):
        d = per_rank[r]
        d["hbm_cap_bytes"], d["ddr_cap_bytes"] = mem.hbm_bytes, mem.ddr_bytes
        d["hbm_usable_bytes"], d["ddr_usable_bytes"] = mem.hbm_usable, mem.ddr_usable
        d["hbm_used_fraction"] = d["hbm_bytes"] / mem.hbm_usable if mem.hbm_usable else 0.0
        d["ddr_used_fraction"] = d["ddr_bytes"] / mem.ddr_usable if mem.ddr_usable else 0.0
        ranks.append(d)
    return shards, ranks


def _summary(ranks: List[dict]) -> Dict[str, Any]:
    return {
        "max_hbm_bytes": max(d["hbm_bytes"] for d in ranks),
        "max_ddr_bytes": max(d["ddr_bytes"] for d in ranks),
        "total_hbm_bytes": sum(d["hbm_bytes"] for d in ranks),
        "total_ddr_bytes": sum(d["ddr_bytes"] for d in ranks),
        "max_hbm_used_fraction": max(d["hbm_used_fraction"] for d in ranks),
        "max_ddr_used_fraction": max(d["ddr_used_fraction"] for d in ranks),
        "max_planner_ms_per_step": max(d["planner_ms"] for d in ranks),
    }


def _capturing_planner(train_cfg: Any, device: Any, topology: Any, ids_per_sample: int, batch_size_per_rank: int,
                       reserve_percentage: float) -> Tuple[Any, List[Any]]:
    """Training's planner for the item table, and the list its hook fills with the winning ShardingOptions."""
    from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation

    from mtrec_dist.models.embeddings import ITEM_TABLE
    from mtrec_dist.training.sharding import make_planner

    captured: List[Any] = []

    def _capture(best):  # public planner hook: sees the winning ShardingOptions (with storage and perf)
        captured[:] = best
        return best

    planner = make_planner(
        [ITEM_TABLE], train_cfg, device, topology, pooling_factor=float(ids_per_sample),
        batch_size=int(batch_size_per_rank),
        storage_reservation=FixedPercentageStorageReservation(percentage=reserve_percentage),
        debug=False,
        callbacks=[_capture],
    )
    return planner, captured


def _plan_or_explain(planner: Any, module: Any, sharders: List[Any], sharding: str, compute_device: str,
                     does_not_fit: Callable[[str], str]) -> Any:
    """``planner.plan``, with TorchRec's errors turned into a :class:`CapacityError` that says what to change."""
    from torchrec.distributed.planner.types import PlannerError

    try:
        return planner.plan(module, sharders)
    except RuntimeError as e:
        if "No available sharding type" not in str(e):
            raise
        raise CapacityError(f"no sharding of the item table satisfies --sharding {sharding} on {compute_device}: "
                            f"{e}") from None
    except PlannerError as e:
        raise CapacityError(does_not_fit(str(e))) from None


def _best_option(plan: Any, captured: List[Any]) -> Any:
    """The item table's winning ShardingOption, checked against the plan the planner returned."""
    from mtrec_dist.models.embeddings import ITEM_TABLE

    if not captured:
        raise CapacityError("the TorchRec planner returned no sharding options for the item table")
    so = captured[0]
    param_sharding = plan.get_plan_for_module("ec")[ITEM_TABLE]
    if param_sharding.sharding_type != so.sharding_type:  # the hook and the returned plan must agree
        raise CapacityError(f"planner inconsistency: plan says {param_sharding.sharding_type}, "
                            f"best option says {so.sharding_type}")
    return so


def _table_bytes(num_items: int, embedding_dim: int, sparse_optimizer: str) -> Tuple[int, int]:
    """fp32 weights of the item table, and its fused optimizer's state."""
    table_bytes = num_items * embedding_dim * FP32_BYTES
    opt_mult = {"exact_rowwise_adagrad": 1.0 / embedding_dim, "exact_adagrad": 1.0, "exact_sgd": 0.0}
    return table_bytes, math.ceil(table_bytes * opt_mult[sparse_optimizer])


def _inputs(num_items, embedding_dim, world_size, local_world_size, hbm_gb_per_rank, ddr_gb_per_rank,
            compute_device, batch_size_per_rank, ids_per_sample, sharding, sparse_optimizer, reserve_fraction,
            features) -> Dict[str, Any]:
    """The request as the report shows it."""
    return {
        "num_items": num_items, "embedding_dim": embedding_dim, "world_size": world_size,
        "local_world_size": local_world_size, "nodes": world_size // local_world_size,
        "hbm_gb_per_rank": hbm_gb_per_rank if compute_device == "cuda" else 0.0,
        "ddr_gb_per_rank": ddr_gb_per_rank, "compute_device": compute_device,
        "batch_size_per_rank": int(batch_size_per_rank), "ids_per_sample": int(ids_per_sample),
        "sharding": sharding, "sparse_optimizer": sparse_optimizer, "reserve_fraction": reserve_fraction,
        "features": features,
    }


def _meta_item_table(num_items: int, embedding_dim: int, features: List[str], sparse_optimizer: str):
    """The real item table on the ``meta`` device (no memory), with its fused optimizer registered."""
    import torch
    from torch.distributed.optim import _apply_optimizer_in_backward

    from mtrec_dist.models.embeddings import ItemEmbedding

    module = ItemEmbedding(num_items, embedding_dim, feature_names=features, device=torch.device("meta"))
    # The planner counts fused optimizer state from the parameters' registered optimizer classes.
    _apply_optimizer_in_backward(_optimizer_class(sparse_optimizer), module.parameters(), {"lr": 0.01})
    return module


def plan_capacity(
    num_items: int,
    embedding_dim: int,
    world_size: int,
    local_world_size: Optional[int] = None,
    hbm_gb_per_rank: float = 80.0,
    ddr_gb_per_rank: float = 128.0,
    compute_device: str = "cuda",
    batch_size_per_rank: int = 256,
    ids_per_sample: int = 21,
    sharding: str = "auto",
    sparse_optimizer: str = "exact_rowwise_adagrad",
    reserve_fraction: float = 0.15,
    feature_names: Optional[Sequence[str]] = None,
) -> Dict[str, Any]:
    """Plan the item table for a target topology; see the module docstring for what is returned.

    ``hbm_gb_per_rank``/``ddr_gb_per_rank`` are GiB (2^30 bytes, as TorchRec counts) per rank (GPU);
    ``reserve_fraction`` of HBM (of DDR when ``compute_device == "cpu"``) is kept for dense parameters,
    activations and the allocator.  Raises :class:`CapacityError` when the table does not fit.
    """
    import torch
    import torchrec
    from mtrec_dist.config import TrainConfig
    from mtrec_dist.models.embeddings import DEFAULT_FEATURES, ITEM_TABLE
    from mtrec_dist.training.sharding import make_sharders, make_topology

    num_items, embedding_dim, world_size = int(num_items), int(embedding_dim), int(world_size)
    if local_world_size is None:
        local_world_size = world_size if world_size <= 8 else 8
    local_world_size = int(local_world_size)
    _validate(num_items, embedding_dim, world_size, local_world_size, hbm_gb_per_rank, ddr_gb_per_rank,
              compute_device, batch_size_per_rank, ids_per_sample, sharding, sparse_optimizer, reserve_fraction)
    features = list(feature_names or DEFAULT_FEATURES)

    t0 = time.perf_counter()
    module = _meta_item_table(num_items, embedding_dim, features, sparse_optimizer)
    mem = _memory(compute_device, hbm_gb_per_rank, ddr_gb_per_rank, reserve_fraction)
    device = torch.device(compute_device)
    # The training configuration being planned: training builds its sharders and constraints from it.
    train_cfg = TrainConfig(sharding=sharding, sparse_optimizer=sparse_optimizer)
    topology = make_topology(world_size, local_world_size, device, hbm_bytes=mem.hbm_bytes, ddr_bytes=mem.ddr_usable)
    planner, captured = _capturing_planner(train_cfg, device, topology, ids_per_sample, batch_size_per_rank,
                                           reserve_fraction if compute_device == "cuda" else 0.0)
    table_bytes, optimizer_bytes = _table_bytes(num_items, embedding_dim, sparse_optimizer)
    sharders = make_sharders(train_cfg)
    _check_sharding_runs(sharders, sharding, compute_device)
    def does_not_fit(planner_msg: str) -> str:
        return _does_not_fit_message(num_items, embedding_dim, table_bytes, optimizer_bytes, world_size,
                                     local_world_size, mem.hbm_bytes, mem.ddr_bytes, compute_device,
                                     reserve_fraction, sharding, planner_msg)

    plan = _plan_or_explain(planner, module, sharders, sharding, compute_device, does_not_fit)
    seconds = time.perf_counter() - t0
    so = _best_option(plan, captured)
    shards, ranks = _rank_usage(so, world_size, local_world_size, mem)
    return {
        "inputs": _inputs(num_items, embedding_dim, world_size, local_world_size, hbm_gb_per_rank, ddr_gb_per_rank,
                          compute_device, batch_size_per_rank, ids_per_sample, sharding, sparse_optimizer,
                          reserve_fraction, features),
        "table": {
            "name": ITEM_TABLE, "rows": num_items, "dim": embedding_dim, "weight_bytes": table_bytes,
            "optimizer_bytes": optimizer_bytes,
        },
        "plan": {
            "sharding_type": so.sharding_type, "compute_kernel": so.compute_kernel,
            "ranks": sorted({s["rank"] for s in shards}), "num_shards": len(shards), "shards": shards,
            "text": str(plan),
        },
        "ranks": ranks,
        "summary": _summary(ranks),
        "all_to_all": _all_to_all(so.sharding_type, shards, world_size, num_items, embedding_dim,
                                  batch_size_per_rank, ids_per_sample, len(features), table_bytes),
        "planner": {"seconds": round(seconds, 3), "torchrec_version": torchrec.__version__,
                    "torch_version": torch.__version__},
    }


def _all_to_all(sharding_type: str, shards: List[dict], world_size: int, num_items: int, dim: int,
                batch: int, n_ids: int, n_features: int, table_bytes: int) -> Dict[str, Any]:
    """Bytes each rank sends/receives per step under the uniform-id assumption (ALL_TO_ALL_FORMULA)."""
    b, n = int(batch), int(n_ids)
    if sharding_type == "data_parallel":
        allreduce = 2.0 * (world_size - 1) / world_size * table_bytes
        zeros = [0] * world_size
        return {
            "formula": ALL_TO_ALL_FORMULA, "applies": False,
            "ids_sent_bytes": zeros, "embeddings_received_bytes": zeros, "gradients_sent_bytes": zeros,
            "sent_bytes": zeros, "received_bytes": zeros, "max_sent_bytes_per_rank": 0,
            "max_received_bytes_per_rank": 0, "cluster_bytes_per_step": 0,
            "gradient_allreduce_bytes_per_rank": int(allreduce),
        }
    ids_sent = [0.0] * world_size
    emb_recv = [0.0] * world_size
    grad_sent = [0.0] * world_size
    ids_recv = [0.0] * world_size
    emb_sent = [0.0] * world_size
    grad_recv = [0.0] * world_size
    for sh in shards:
        q = sh["rank"]
        f = sh["sizes"][0] / num_items
        c = sh["sizes"][1]
        ids_b = b * n * f * ID_BYTES + b * n_features * LENGTH_BYTES
        emb_b = b * n * f * c * FP32_BYTES
        for p in range(world_size):
            if p == q:
                continue
            ids_sent[p] += ids_b
            ids_recv[q] += ids_b
            emb_recv[p] += emb_b
            emb_sent[q] += emb_b
            grad_sent[p] += emb_b
            grad_recv[q] += emb_b
    sent = [ids_sent[r] + emb_sent[r] + grad_sent[r] for r in range(world_size)]
    recv = [ids_recv[r] + emb_recv[r] + grad_recv[r] for r in range(world_size)]
    as_int = lambda xs: [int(round(x)) for x in xs]  # noqa: E731
    return {
        "formula": ALL_TO_ALL_FORMULA, "applies": True,
        "ids_sent_bytes": as_int(ids_sent), "embeddings_received_bytes": as_int(emb_recv),
        "gradients_sent_bytes": as_int(grad_sent),
        "sent_bytes": as_int(sent), "received_bytes": as_int(recv),
        "max_sent_bytes_per_rank": int(round(max(sent))), "max_received_bytes_per_rank": int(round(max(recv))),
        "cluster_bytes_per_step": int(round(sum(sent))),
        "gradient_allreduce_bytes_per_rank": 0,
    }


def _does_not_fit_message(num_items, dim, table_bytes, optimizer_bytes, world_size, local_world_size, hbm_bytes,
                          ddr_bytes, device, reserve, sharding, planner_msg) -> str:
    need = table_bytes + optimizer_bytes
    if device == "cuda":
        per_rank = hbm_bytes * (1.0 - reserve)
        where = f"{world_size} rank(s) x {hbm_bytes / GIB:.1f} GiB HBM ({reserve:.0%} reserved)"
    else:
        per_rank = ddr_bytes * (1.0 - reserve)
        where = f"{world_size} rank(s) x {ddr_bytes / GIB:.1f} GiB DDR ({reserve:.0%} reserved)"
    min_ranks = math.ceil(need / per_rank) if per_rank > 0 else 0
    min_ranks = math.ceil(min_ranks / local_world_size) * local_world_size  # whole nodes
    last = planner_msg.strip().splitlines()
    detail = next((ln.strip() for ln in reversed(last) if ln.strip()), "")
    lines = [
        f"the item table does not fit: {num_items:,} rows x {dim} dims = {table_bytes / GIB:,.1f} GiB of fp32 "
        f"weights + {optimizer_bytes / GIB:,.1f} GiB optimizer state, on {where}.",
        "Options:",
        f"  - more ranks: at least --world-size {min_ranks} ({min_ranks // local_world_size} node(s) x "
        f"{local_world_size}) at this memory per rank (counts weights + optimizer only; the planner also needs "
        "room for input/output buffers)",
        "  - more memory per rank: raise --hbm-gb" + (" or --ddr-gb (the planner can keep rows in host memory "
                                                        "with the UVM kernels)" if device == "cuda" else "")
        if device == "cuda" else "  - more memory per rank: raise --ddr-gb",
        "  - a smaller table: fewer items (--items) or a smaller embedding (--dim)",
    ]
    if sharding in ("table_wise", "data_parallel"):
        lines.append(f"  - --sharding {sharding} keeps the whole table on one rank; try --sharding row_wise or auto")
    lines.append(f"TorchRec planner: {detail}")
    return "\n".join(lines)
