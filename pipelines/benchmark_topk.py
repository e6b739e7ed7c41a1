"""Top-K benchmark on MovieLens-100k: adrec's two-stage path vs most-popular, ALS, BPR, item-item
(cosine, BM25) and EASE, under DESIGN.md's protocol. All logic lives in ``adrec.topk.benchmark``.

    python pipelines/benchmark_topk.py --data-dir ../shared/data/ml-100k --out runs/bench_topk [--repeats 3] [--quick]
        [--reranker sklearn]

Features come from ``--run`` when it already holds a prepared run; otherwise the prepare stage
(Ray Data, a local Ray) builds them into ``--run`` (default: OUT/run) first. Exit status 1 when
adrec misses its target (+7% over the best peer on NDCG@10 and Recall@10), 0 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", help="the unpacked ml-100k folder (needed unless --run is prepared)")
    p.add_argument("--out", required=True, help="folder for topk_benchmark.json / .md")
    p.add_argument("--run", help="prepared run folder to reuse (default: OUT/run, prepared when missing)")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats (medians reported)")
    p.add_argument("--quick", action="store_true", help="small grids, one re-ranker stage (~1-2 minutes)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray of the prepare stage")
    p.add_argument("--reranker", choices=("auto", "lightgbm", "sklearn"), default="auto",
                   help="adrec's re-ranker: auto = LightGBM when installed (the bench extra), else scikit-learn")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from adrec.features.pipeline import Features
    from adrec.run import RunDir
    from adrec.topk.benchmark import run_benchmark

    out = Path(args.out)
    run = RunDir(args.run or out / "run")
    if not (run.features / "interactions.parquet").is_file():
        if not args.data_dir:
            p.error(f"{run.path} holds no prepared features: pass --data-dir (the ml-100k folder)")
        _prepare(run, args.data_dir, args.num_cpus)
    result = run_benchmark(Features(run), out, repeats=args.repeats, quick=args.quick,
                           two_stage_kwargs={"ranker": args.reranker})
    print((out / "topk_benchmark.md").read_text())
    return 0 if result["target_met"] else 1


def _prepare(run, data_dir: str, num_cpus: int | None) -> None:
    import ray

    from adrec.config import build_config
    from adrec.features.pipeline import prepare
    from adrec.runtime import init_ray

    cfg = build_config(overrides=["data.dataset=movielens-100k", f"data.data_dir={Path(data_dir).resolve()}"])
    started = not ray.is_initialized()
    init_ray(cfg.ray, **({"num_cpus": num_cpus} if num_cpus else {}))
    try:
        prepare(cfg, run)
    finally:
        if started:  # free the Ray processes before anything is timed
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
