"""The scale benchmark (issue 13): the streaming prepare on synthetic logs of growing size, and the
in-process prepare (tables read whole with pandas in the driver) beside it at the smaller sizes.

For each size the synthetic generator writes the log as Parquet shards (200k users, 20k ads by default);
the in-process path reads the same rows from one CSV. Each prepare runs in a fresh child process with
its own local Ray, so its figures are its own: prepare wall time (Ray's start excluded), rows/s, the peak
RSS of the driver (the child's ``ru_maxrss``) and the peak memory used on the machine while it ran
(sampled every 0.25 s; the machine's use before the run is reported beside it, since other work shares
the machine). Results: ``scale.json``, ``scale.md`` and ``scale.png`` under ``--out``.

With ``--train`` the same child then trains the ranker for one epoch on what it prepared (``TRAIN_OVERRIDES``:
the tiny random encoder, one selection epoch, no refit): the streaming run through the streamed feed
(``TorchTrainer(datasets=...)``, ``ranker.data_feed=auto``), the in-process run through the in-memory one
(arrays put in the object store). Reported: the epoch's samples/s (the train rows over the epoch's own
seconds, Ray Train's start excluded), the train stage's wall time and the driver's peak RSS after it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform as _platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
PATHS = {"streaming": "streaming", "in_process": "in_process"}


def _generate(folder: Path, rows: int, users: int, ads: int, shard_rows: int) -> Path:
    """The log as Parquet shards (and, for the in-process path, one CSV of the same rows in the same order)."""
    from adrec.config import SyntheticConfig
    from adrec.data.synthetic import generate

    if not (folder / "schema.yaml").is_file():
        generate(SyntheticConfig(n_users=users, n_ads=ads, n_impressions=rows, shard_rows=shard_rows), folder)
    return folder / "schema.yaml"


def _single_csv(folder: Path) -> Path:
    """A copy of the schema whose impressions are one CSV (the in-process path reads one file)."""
    import pandas as pd

    csv = folder / "impressions.csv"
    if not csv.is_file():
        parts = sorted((folder / "impressions").glob("*.parquet"))
        for i, p in enumerate(parts):
            pd.read_parquet(p).to_csv(csv, index=False, header=i == 0, mode="w" if i == 0 else "a")
    schema = folder / "schema-csv.yaml"
    schema.write_text((folder / "schema.yaml").read_text().replace("path: impressions\n", "path: impressions.csv\n")
                      .replace("  format: parquet\n", ""))
    return schema


def _start_ray(ray_cfg, attempts: int = 6) -> None:
    """Ray's local start, retried: on a machine loaded by other work its raylet may miss Ray's fixed 30 s
    registration wait (seen here at load averages of 40-70). Not part of the measured time."""
    import ray

    from adrec.runtime import init_ray

    for attempt in range(attempts):
        try:
            init_ray(ray_cfg)
            return
        except Exception as err:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(err) or attempt == attempts - 1:
                raise
            log.warning("Ray did not start (%s); again in 10 s", err)
            ray.shutdown()
            time.sleep(10)


#: The ranker of the one measured epoch, cheaper than the default so that an epoch of 16M impressions fits on
#: 2 shared cores (the point is the data plane's scaling): no item text tower (the encoder never runs) and
#: batches of 4,096 rows; the same fields, crosses, history attention, cross and deep towers as the default.
TRAIN_OVERRIDES = ["ranker.tiny_encoder=true", "ranker.text_tower=false", "ranker.batch_size=4096", "ranker.epochs=1",
                   "ranker.refit=false", "ranker.resume=false"]


def _child(args) -> int:
    """One prepare in this process; prints a JSON line with its figures."""
    from adrec.config import build_config
    from adrec.features.pipeline import prepare
    from adrec.run import RunDir

    cfg_overrides = [f"data.dataset={args.schema}", "data.pseudonym_key=bench-key",
                     f"features.pipeline={args.pipeline}", f"ray.num_cpus={args.cpus}",
                     f"features.history_len={args.history_len}"]
    cfg = build_config(overrides=cfg_overrides)
    _start_ray(cfg.ray)
    t0 = time.perf_counter()
    counts = prepare(cfg, RunDir(args.run))
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "rows": counts["interactions"],
           "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if args.train:
        from adrec.ranking.train import train_ranker

        tcfg = build_config(overrides=[*cfg_overrides, *TRAIN_OVERRIDES])
        t0 = time.perf_counter()
        summary = train_ranker(tcfg, RunDir(args.run))
        epoch = summary["history"][0]
        out.update(train_seconds=time.perf_counter() - t0, epoch_seconds=epoch["seconds"],
                   epoch_samples_per_s=epoch["samples_per_s"], data_feed=summary["data_feed"],
                   valid_auc=summary["valid_auc"],
                   driver_peak_rss_after_train_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print("RESULT " + json.dumps(out))
    return 0


def _run_child(schema: Path, pipeline: str, run: Path, cpus: int, history_len: int, train: bool = False) -> dict:
    import psutil

    before = psutil.virtual_memory().used
    load_before = os.getloadavg()[0]
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.wait(0.25):
            peak[0] = max(peak[0], psutil.virtual_memory().used)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    # RAY_worker_niceness=0: Ray's workers at the driver's own priority. Ray's default (15) renices them
    # below everything else on the machine, so on a shared machine the Ray Data tasks (the streaming path's
    # whole work) would get the CPU only when other work leaves it, while the in-process path's pandas runs in
    # the driver: the comparison would measure the scheduler, not the pipelines.
    env = dict(os.environ, RAY_worker_niceness="0",
               PYTHONPATH=os.pathsep.join([str(REPO / "platform"), str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "benchmarks.scale", "--child", "--schema", str(schema), "--pipeline", pipeline,
           "--run", str(run), "--cpus", str(cpus), "--history-len", str(history_len), *(["--train"] if train else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    done.set()
    thread.join()
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{pipeline} prepare of {schema} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(line[len("RESULT "):])
    out.update(pipeline=pipeline, process_seconds=wall, load_average_1min_before=load_before,
               load_average_1min_after=os.getloadavg()[0],
               machine_used_before_mb=before / 2**20,
               machine_peak_used_mb=peak[0] / 2**20, rows_per_s=out["rows"] / out["seconds"])
    return out


def _train_table(results: list[dict]) -> str:
    rs = [r for r in results if "epoch_samples_per_s" in r]
    if not rs:
        return ""
    head = ("\n| impressions | pipeline | training feed | epoch s (train + valid pass) | epoch samples/s (train pass) | "
            "train stage s | valid AUC | driver peak RSS after train MB |\n|---:|---|---|---:|---:|---:|---:|---:|\n")
    return head + "".join(
        f"| {r['rows']:,} | {r['pipeline']} | {r['data_feed']} | {r['epoch_seconds']:.1f} | "
        f"{r['epoch_samples_per_s']:,.0f} | {r['train_seconds']:.1f} | {r['valid_auc']:.4f} | "
        f"{r['driver_peak_rss_after_train_mb']:,.0f} |\n" for r in rs)


def _table(results: list[dict]) -> str:
    head = ("| impressions | pipeline | prepare s | rows/s | driver peak RSS MB | machine used before MB | "
            "machine peak used MB | load avg (1 min) before / after |\n|---:|---|---:|---:|---:|---:|---:|---:|\n")
    return head + "".join(
        f"| {r['rows']:,} | {r['pipeline']} | {r['seconds']:.1f} | {r['rows_per_s']:,.0f} | "
        f"{r['driver_peak_rss_mb']:,.0f} | {r['machine_used_before_mb']:,.0f} | {r['machine_peak_used_mb']:,.0f} | "
        f"{r['load_average_1min_before']:.0f} / {r['load_average_1min_after']:.0f} |\n"
        for r in results)


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for pipeline in PATHS:
        rs = sorted((r for r in results if r["pipeline"] == pipeline), key=lambda r: r["rows"])
        if not rs:
            continue
        x = [r["rows"] for r in rs]
        ax_t.plot(x, [r["seconds"] for r in rs], "o-", label=pipeline)
        ax_m.plot(x, [r["driver_peak_rss_mb"] for r in rs], "o-", label=f"{pipeline}: driver peak RSS")
        ax_m.plot(x, [r["machine_peak_used_mb"] - r["machine_used_before_mb"] for r in rs], "s--",
                  label=f"{pipeline}: machine peak - before")
    ax_t.set(xlabel="impressions", ylabel="prepare seconds", title="prepare time")
    ax_m.set(xlabel="impressions", ylabel="MB", title="memory")
    for ax in (ax_t, ax_m):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_results/scale")
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000, 16_000_000])
    p.add_argument("--in-process-sizes", type=int, nargs="*", default=[1_000_000, 4_000_000],
                   help="sizes at which the in-process (pandas in the driver) prepare also runs")
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--ads", type=int, default=20_000)
    p.add_argument("--shard-rows", type=int, default=250_000)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--history-len", type=int, default=50)
    p.add_argument("--train", action="store_true",
                   help="after each prepare, train the ranker one epoch on it (TRAIN_OVERRIDES) and report samples/s")
    p.add_argument("--train-pipelines", nargs="+", choices=list(PATHS), default=list(PATHS),
                   help="with --train: the pipelines whose run trains (default both)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--schema", help=argparse.SUPPRESS)
    p.add_argument("--pipeline", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for n in args.sizes:
        data = out / f"data-{n}"
        t0 = time.perf_counter()
        schema = _generate(data, n, args.users, args.ads, args.shard_rows)
        log.info("%d impressions generated in %.0fs", n, time.perf_counter() - t0)
        runs = [("streaming", schema)]
        if n in args.in_process_sizes:
            runs.append(("in_process", _single_csv(data)))
        for pipeline, sch in runs:
            train = args.train and pipeline in args.train_pipelines
            r = _run_child(sch, pipeline, out / f"run-{n}-{pipeline}", args.cpus, args.history_len, train)
            log.info("%s", r)
            results.append(r)
            (out / "scale.json").write_text(json.dumps({
                "command": "python pipelines/benchmark_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "machine": {"cpus": os.cpu_count(), "python": _platform.python_version(),
                            "memory_gb": round(__import__("psutil").virtual_memory().total / 2**30, 1)},
                "users": args.users, "ads": args.ads, "results": results}, indent=2))
            (out / "scale.md").write_text(_table(results) + _train_table(results))
    _plot(results, out / "scale.png")
    print(_table(results) + _train_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
