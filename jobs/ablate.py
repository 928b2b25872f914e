"""Ray Job entry point: `mtrec ablate`. The reward ablation (rows A-I) over several simulated worlds; each
(world, training seed) runs as a Ray task of one CPU on any node of the cluster (`ablation.parallel`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env cluster/runtime_env.yaml \
        -- python jobs/ablate.py --storage-path /shared/mtrec/ablation --config configs/ablation.yaml

See jobs/_entry.py for the arguments and exit statuses, docs/cluster.md for clusters and tokens.
"""
from _entry import run_job  # jobs/ is sys.path[0] when this file runs as a script

if __name__ == "__main__":
    run_job("ablate")
