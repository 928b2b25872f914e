"""Ray Job entry point: `mtrec bench`. Benchmark the library against single-process baselines.

    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env cluster/runtime_env.yaml \
        -- python jobs/bench.py --storage-path /shared/mtrec/bench1 [--quick] [--config FILE] [--set k=v ...]

The storage path becomes ``run_dir`` (scratch data and bench.json under ``<storage-path>/bench``); it must be
a local path every node can reach, since the baselines read the files directly.  ``--append-results`` would
write into the job's temporary copy of the checkout: pass ``--append-results /shared/RESULTS.md`` instead.
See jobs/_entry.py for the arguments and exit statuses, docs/cluster.md for clusters and tokens.
"""
from _entry import run_job  # jobs/ is sys.path[0] when this file runs as a script

if __name__ == "__main__":
    run_job("bench")
