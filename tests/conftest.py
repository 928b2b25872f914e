"""Shared fixtures.  The Ray cluster is started once per test session (2 CPUs, like CI)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

SHARED_DATA = Path(os.environ.get("MTREC_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with 2 CPUs, shared by every test that asks for it."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ml1m_dir() -> Path:
    """The MovieLens-1M folder beside the checkout; tests that need it skip when it is absent."""
    d = SHARED_DATA / "ml-1m"
    if not (d / "ratings_users0001-2999.dat").exists():
        pytest.skip(f"MovieLens-1M not found at {d} (set MTREC_DATA_DIR); licence forbids shipping it")
    return d
