"""`mtrec bench`: is the distributed library faster than what a user would write instead?

One module per idea:

* :mod:`.machine` -- what the numbers were measured on (load average, cores, versions);
* :mod:`.sizes` -- the benchmark's sizes (``--quick`` and the default) and the config it trains with;
* :mod:`.world` -- the simulated logs every stage is measured on (cached between runs);
* :mod:`.checksum` -- row counts and an order-independent checksum of prepared transitions;
* :mod:`.plain_prepare` -- ``prepare`` as one pandas/pyarrow process (the baseline);
* :mod:`.prepare_bench` -- library ``prepare_dataset`` vs the baseline, same output checked;
* :mod:`.plain_models` -- the library's models on one ``nn.Embedding`` (no TorchRec), same loss checked;
* :mod:`.plain_train` -- the single-process training loop a user would write (the baseline);
* :mod:`.steady` -- steady-state throughput and where the time went, from a run's metrics events;
* :mod:`.ray_train` -- the library's training entry points with N Ray Train workers, timed;
* :mod:`.train_bench` -- one model: plain vs 1 vs 2 workers;
* :mod:`.scoring_bench` -- ``score-rewards`` vs a plain scoring loop (same scores checked) and training;
* :mod:`.catalog_steps` -- QR-IQL step time and peak memory per rank against catalog size, the table
  row-wise over 2 workers (``--catalog-sizes``);
* :mod:`.plots` -- the scale curves (catalog, ``--prepare-scale``) as ``<work>/bench_scale.png``;
* :mod:`.sharded_bench` -- scoring and ranking a catalog with the table sharded (``--sharded-items``);
* :mod:`.peer` -- our four backbones against RecBole 1.2.1's on MovieLens-1M (``--peer recbole``), RecBole
  run by :mod:`.recbole_peer_run` in its own venv;
* :mod:`.report` -- the ratios side by side: JSON, a console table, a Markdown section for bench/RESULTS.md;
* :mod:`.runner` -- one whole run in order.

Speed goals live here, never in tests: tests check only that each baseline computes the library's result.
"""
