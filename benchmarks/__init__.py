"""adrec's benchmarks: adrec beside its peers on the same data, and the result files they wrote.

Not part of the library (``adrec`` never imports this package); run from a checkout, through the thin
``pipelines/benchmark_*.py`` entrypoints (also Ray jobs with ``--working-dir .``). The peers' packages
are in the ``bench`` extra (``pip install -e '.[bench]'``).

- :mod:`benchmarks.loadtest`: closed-loop HTTP load client and latency / CPU accounting.
- :mod:`benchmarks.serving`: the Serve app over HTTP vs the same top-10 in-process, cached vs
  encoder-per-request (``pipelines/benchmark_serving.py``).
- :mod:`benchmarks.serve_floor`: Serve's floor, the same HTTP path with no model behind it.
- :mod:`benchmarks.online`: frozen vs online model through a preference drift (``pipelines/benchmark_online.py``).
- :mod:`benchmarks.topk`: the two-stage top-K path vs the classic peers (``pipelines/benchmark_topk.py``).
- :mod:`benchmarks.ranker`: the CTR ranker vs its peers (``pipelines/benchmark_ranker.py``).
- :mod:`benchmarks.scale`: the streaming prepare on synthetic logs of growing size beside the in-process one
  (``pipelines/benchmark_scale.py``).
- :mod:`benchmarks.ope`: off-policy estimators on the Open Bandit Dataset sample in obp, adrec's beside obp's
  (``pipelines/benchmark_ope.py``).
- :mod:`benchmarks.ranker_peers`: the ranker's peer click models (logistic regression, LightGBM, DeepFM...).

The ``*.json`` / ``*.md`` files beside the modules are the runs the README quotes.
"""
