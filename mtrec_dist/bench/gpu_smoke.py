"""GPU smoke test in one process, without Ray: what a CUDA machine can check of the library on its own.

``mtrec bench`` needs Ray, TorchRec's sharded kernels and the CUDA build of fbgemm-gpu on the GPU machine.  Where
those cannot be installed (a lent machine whose image has another torch and no way to fetch packages), this
still checks the parts that decide whether the library *runs* on a GPU:

* the automatic choice: ``train.use_gpu: auto`` picks the GPU and NCCL (``runtime``);
* NCCL itself: a one-rank process group's all-reduce on the GPU;
* every model (QR-IQL, the four backbones, SASRec under each guidance mode) built by the library's factories,
  moved to the GPU: the TorchRec table's unsharded path computes the same loss terms there as its plain
  ``nn.Embedding`` copy (:func:`~mtrec_dist.bench.plain_models.check_same_loss`, both on the GPU, same random
  stream), and a few training steps keep the loss finite;
* throughput of the plain single-process loop (the benchmark's baseline) on the CPU and on the GPU, and the
  QR-IQL step time as the catalog grows (sampled soft value), on synthetic batches.

``python -m mtrec_dist.bench.gpu_smoke --out DIR`` writes ``gpu_smoke.json``; with no GPU it runs the CPU parts
and says the GPU ones were skipped.  Each part records its own error instead of stopping the rest.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import torch

from mtrec_dist.choices import BACKBONES, CLICK_TRAINED, GUIDANCE_MODES
from mtrec_dist.config import PipelineConfig, load_config

from .sizes import stage_of

RESULT = "gpu_smoke.json"
# the demo's model sizes where this is a checkout (run from any folder); the built-in defaults elsewhere
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
DEFAULT_ITEMS = 10_000
CATALOG_SIZES = (10_000, 1_000_000, 10_000_000)  # the issue-9 scale curve's ends and middle
STATE_LEN = 10
# QR-IQL, every backbone trained on clicks, and SASRec under each reward guidance
DEFAULT_MODELS = ("qriql", *BACKBONES, *(f"sasrec/{g}" for g in GUIDANCE_MODES if g != CLICK_TRAINED))


def _part(fn: Callable[[], Any]) -> Dict[str, Any]:
    """``fn()``'s result, or the error it raised (type, message, last traceback lines): one broken part must
    not hide the others."""
    t = time.perf_counter()
    try:
        return {"ok": True, "result": fn(), "seconds": round(time.perf_counter() - t, 2)}
    except Exception as e:  # recorded, not swallowed: the report prints it
        return {"ok": False, "error": f"{type(e).__name__}: {e}",
                "trace": traceback.format_exc().splitlines()[-6:], "seconds": round(time.perf_counter() - t, 2)}


def environment() -> Dict[str, Any]:
    """Versions, the GPU, and which of the stack's packages import here."""
    probes = {}
    for name in ("torchrec", "fbgemm_gpu", "ray", "tensordict"):
        try:
            mod = importlib.import_module(name)
            probes[name] = getattr(mod, "__version__", "imported")
        except Exception as e:  # a missing or mismatched package is the finding, not a failure
            probes[name] = f"unavailable ({type(e).__name__}: {str(e)[:160]})"
    out = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "packages": probes,
           "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None}
    out["fbgemm_cuda_kernels"] = _fbgemm_cuda_kernels() if torch.cuda.is_available() else None
    return out


def _fbgemm_cuda_kernels() -> str:
    """Whether fbgemm's CUDA operators exist (TorchRec's FUSED kernels need them on a GPU)."""
    try:
        import fbgemm_gpu  # noqa: F401  registers torch.ops.fbgemm
        x = torch.tensor([1, 2, 3], dtype=torch.int64, device="cuda")
        torch.ops.fbgemm.asynchronous_complete_cumsum(x)
        return "present"
    except Exception as e:
        return f"absent ({type(e).__name__}: {str(e)[:160]})"


def device_selection() -> Dict[str, Any]:
    """What ``train.use_gpu: auto`` resolves to here, and the backend that follows from it."""
    from mtrec_dist.runtime import dist_backend, resolve_use_gpu

    use_gpu = resolve_use_gpu("auto")
    expected = torch.cuda.is_available()
    if use_gpu != expected:
        raise AssertionError(f"use_gpu auto resolved to {use_gpu}, but torch.cuda.is_available() is {expected}")
    return {"use_gpu_auto": use_gpu, "backend": dist_backend(use_gpu)}


def nccl_all_reduce() -> Dict[str, Any]:
    """A one-rank NCCL group: all-reduce a GPU tensor and check the sum."""
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            t = torch.arange(4, dtype=torch.float32, device="cuda")
            dist.all_reduce(t)
            torch.cuda.synchronize()
            if t.tolist() != [0.0, 1.0, 2.0, 3.0]:
                raise AssertionError(f"all_reduce over one rank changed the tensor: {t.tolist()}")
            return {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "sum": float(t.sum())}
        finally:
            dist.destroy_process_group()


def _backbone_guidance(name: str) -> tuple:
    """``"sasrec/reweight"`` -> ``("sasrec", "reweight")``; a bare backbone is trained on clicks."""
    backbone, _, guidance = name.partition("/")
    return backbone, guidance or CLICK_TRAINED


def build_model(name: str, cfg: PipelineConfig, num_items: int) -> torch.nn.Module:
    """The library's model as training builds it (unsharded, TorchRec table on the CPU): ``"qriql"``, a
    backbone trained on clicks, or ``"backbone/guidance"``."""
    manifest = {"num_items": num_items, "state_len": STATE_LEN}
    counts = [1.0] * (num_items + 1)  # synthetic batches have no popularity: a popularity sampler draws uniformly
    if name == "qriql":
        from mtrec_dist.training.reward import model_spec, reward_model_factory

        return reward_model_factory(model_spec(cfg, manifest), counts)(torch.device("cpu"))
    from mtrec_dist.training.recommender import rec_model_spec, recommender_factory

    backbone, guidance = _backbone_guidance(name)
    return recommender_factory(rec_model_spec(cfg, manifest, backbone, guidance), counts)(torch.device("cpu"))


REWARD_COLUMNS = ("reward_mean", "reward_baseline", "reward_cvar", "reward_cvar_baseline")  # what guidance reads


def _batch(num_items: int, batch_size: int, seed: int, device: torch.device) -> Dict[str, torch.Tensor]:
    """A synthetic training batch (:func:`~.catalog_steps.synthetic_batch`) with random reward scores, as
    score-rewards writes them for guided training (models that do not read them ignore them)."""
    from .catalog_steps import synthetic_batch

    batch = synthetic_batch(num_items, batch_size, STATE_LEN, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    batch.update({k: torch.randn(batch_size, generator=g) for k in REWARD_COLUMNS})
    return {k: v.to(device) for k, v in batch.items()}


def model_on_gpu(name: str, cfg: PipelineConfig, num_items: int, steps: int) -> Dict[str, Any]:
    """The library model on the GPU: same loss terms as its plain copy there, finite loss after ``steps`` steps."""
    from .plain_models import check_same_loss, plain_copy
    from .plain_train import make_optimizers, train_step

    gpu = torch.device("cuda")
    torch.manual_seed(0)
    lib = build_model(name, cfg, num_items)
    plain = plain_copy(lib).to(gpu)
    lib = lib.to(gpu)
    tc = cfg.stage_train(stage_of(name))
    same = check_same_loss(lib, plain, _batch(num_items, tc.batch_size, 1, gpu))
    optimizers = make_optimizers(plain, tc.lr, tc.sparse_lr)
    losses = [train_step(plain, optimizers, _batch(num_items, tc.batch_size, 100 + i, gpu)) for i in range(steps)]
    if not all(math.isfinite(x) for x in losses):
        raise AssertionError(f"{name}: non-finite loss on the GPU: {losses}")
    return {"same_loss": same, "first_loss": losses[0], "last_loss": losses[-1], "steps": steps}


def plain_throughput(name: str, cfg: PipelineConfig, num_items: int, steps: int,
                     device: torch.device) -> Dict[str, Any]:
    """The plain loop's samples/s on ``device`` over synthetic rows (the benchmark's baseline model)."""
    from .plain_models import plain_copy
    from .plain_train import train_plain

    tc = cfg.stage_train(stage_of(name))
    torch.manual_seed(0)
    plain = plain_copy(build_model(name, cfg, num_items))
    rows = _batch(num_items, tc.batch_size * 32, 7, torch.device("cpu"))
    rows.pop("mask")  # iter_batches adds it
    res = train_plain(plain, rows, steps=steps, batch_size=tc.batch_size, lr=tc.lr, sparse_lr=tc.sparse_lr,
                      warmup_steps=max(2, steps // 5), device=device)  # each step reads its loss: synced
    return {k: res[k] for k in ("samples_per_s", "step_time_s", "data_wait_frac", "final_loss", "torch_threads")}


def catalog_step_times(cfg: PipelineConfig, sizes: Sequence[int], steps: int) -> List[Dict[str, Any]]:
    """QR-IQL's plain training step on the GPU (sampled soft value, as ``catalog_steps``) as the catalog grows:
    median seconds per step and peak GPU memory.  The whole table sits on the one GPU."""
    from .catalog_steps import DEFAULT_NEGATIVES
    from .plain_models import plain_copy
    from .plain_train import make_optimizers, train_step

    gpu = torch.device("cuda")
    tc = cfg.stage_train("reward")
    if not cfg.reward.num_negatives:  # the full-catalog soft value grows with the table by design
        cfg = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, num_negatives=DEFAULT_NEGATIVES))
    out = []
    for items in sizes:
        torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        plain = plain_copy(build_model("qriql", cfg, items)).to(gpu)
        optimizers = make_optimizers(plain, tc.lr, tc.sparse_lr)
        batches = [_batch(items, tc.batch_size, i, gpu) for i in range(4)]
        times = []
        for i in range(steps + 2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            train_step(plain, optimizers, batches[i % 4])
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        times = sorted(times[2:])
        out.append({"items": items, "negatives": cfg.reward.num_negatives,
                    "step_s_median": times[len(times) // 2], "steps": steps,
                    "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)})
        del plain, optimizers, batches
        torch.cuda.empty_cache()
    base = out[0]["step_s_median"]
    for row in out:
        row["vs_smallest"] = round(row["step_s_median"] / base, 3)
    return out


def run(cfg: PipelineConfig, models: Sequence[str], steps: int, catalog_sizes: Sequence[int]) -> Dict[str, Any]:
    """Every part that this machine can run; GPU parts are skipped (with the reason) where there is no GPU."""
    report: Dict[str, Any] = {"environment": _part(environment), "device_selection": _part(device_selection)}
    has_gpu = torch.cuda.is_available()
    skip = {"ok": False, "error": "skipped: no CUDA GPU on this machine"}
    report["nccl_all_reduce"] = _part(nccl_all_reduce) if has_gpu else skip
    report["models_on_gpu"] = {m: _part(lambda m=m: model_on_gpu(m, cfg, DEFAULT_ITEMS, steps)) if has_gpu else skip
                               for m in models}
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if has_gpu else [])
    report["plain_throughput"] = {m: {d.type: _part(lambda m=m, d=d: plain_throughput(m, cfg, DEFAULT_ITEMS, steps, d))
                                      for d in devices} for m in models}
    report["catalog_steps_gpu"] = _part(lambda: catalog_step_times(cfg, catalog_sizes, steps)) if has_gpu else skip
    return report


def summary_lines(report: Dict[str, Any]) -> List[str]:
    """The report as short lines: each part ok or its error, throughputs and the catalog curve."""
    env = report["environment"].get("result", {})
    lines = [f"torch {env.get('torch')} cuda {env.get('cuda_runtime')} gpu {env.get('gpu')} nccl {env.get('nccl')}",
             f"packages: {env.get('packages')}", f"fbgemm CUDA kernels: {env.get('fbgemm_cuda_kernels')}"]
    for key in ("device_selection", "nccl_all_reduce"):
        part = report[key]
        lines.append(f"{key}: {part['result'] if part['ok'] else part['error']}")
    for m, part in report["models_on_gpu"].items():
        r = part.get("result")
        lines.append(f"{m} on GPU: " + (f"|library - plain| {r['same_loss']['max_abs_diff']:.2g} over "
                                       f"{r['same_loss']['terms_compared']} terms, loss {r['first_loss']:.4f} -> "
                                       f"{r['last_loss']:.4f} in {r['steps']} steps" if r else part["error"]))
    for m, by_device in report["plain_throughput"].items():
        cells = {d: (f"{p['result']['samples_per_s']:,.0f}/s" if p["ok"] else p["error"]) for d, p in by_device.items()}
        ratio = ""
        if all(p["ok"] for p in by_device.values()) and "cuda" in by_device:
            rates = {d: p["result"]["samples_per_s"] for d, p in by_device.items()}
            ratio = f"  (GPU/CPU {rates['cuda'] / rates['cpu']:.2f}x)"
        lines.append(f"plain {m}: {cells}{ratio}")
    cat = report["catalog_steps_gpu"]
    if cat["ok"]:
        lines += [f"qriql step, {r['items']:,} items: {r['step_s_median'] * 1e3:.2f} ms ({r['vs_smallest']}x), "
                  f"peak {r['peak_gpu_mb']:,.0f} MiB" for r in cat["result"]]
    else:
        lines.append(f"catalog_steps_gpu: {cat['error']}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtrec_dist.bench.gpu_smoke", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_smoke.json")
    p.add_argument("--config", default=str(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else None,
                   help="pipeline config for model sizes (default: the checkout's configs/demo.yaml, else the "
                        "built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.batch_size=4096 (repeatable)")
    p.add_argument("--steps", type=int, default=30, help="training steps per timed run (default 30)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help="comma-separated: qriql, backbones (trained on clicks) and backbone/guidance "
                        f"(default: {','.join(DEFAULT_MODELS)})")
    p.add_argument("--catalog-sizes", default=",".join(map(str, CATALOG_SIZES)),
                   help="items per QR-IQL catalog step run on the GPU (default 10^4,10^6,10^7)")
    a = p.parse_args(argv)
    if a.steps < 3:
        p.error(f"--steps must be >= 3, got {a.steps}")
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    unknown = [m for m in models if m != "qriql" and (_backbone_guidance(m)[0] not in BACKBONES
                                                      or _backbone_guidance(m)[1] not in GUIDANCE_MODES)]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from qriql, {', '.join(BACKBONES)}, each backbone optionally "
                f"with /{'|'.join(GUIDANCE_MODES)}")
    sizes = [int(s) for s in a.catalog_sizes.split(",") if s.strip()]
    report = run(load_config(a.config, a.overrides), models, a.steps, sizes)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT).write_text(json.dumps(report, indent=1, default=str))
    for line in summary_lines(report):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
