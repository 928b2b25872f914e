"""Ray Job entry point: `mtrec prepare`. Validate, sessionize and window raw logs into transitions.

    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env cluster/runtime_env.yaml \
        -- python jobs/prepare.py --storage-path s3://BUCKET/mtrec/run1 --config configs/demo.yaml [--set k=v ...]

See jobs/_entry.py for the arguments and exit statuses, docs/cluster.md for clusters and tokens.
"""
from _entry import run_job  # jobs/ is sys.path[0] when this file runs as a script

if __name__ == "__main__":
    run_job("prepare")
