"""``adrec``: each stage of the flow as a command on a run folder, plus the whole demo."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from adrec.config import ConfigError
from adrec.data.errors import DataError
from adrec.run import RunDir, RunError

log = logging.getLogger("adrec.cli")


def _common(p: argparse.ArgumentParser, run_required: bool = True) -> None:
    p.add_argument("--run", required=run_required, help="run folder (created by prepare)")
    p.add_argument("--config", help="YAML config (default: the run's config.yaml, else built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set ranker.epochs=2 (repeatable)")
    p.add_argument("--address", help="Ray address of a running cluster (default: start Ray in-process)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="adrec", description="Personalized ad recommendation on Ray.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="validate, pseudonymize and encode the raw logs (Ray Data)")
    _common(p)
    p.add_argument("--dataset", help="synthetic, movielens-100k, or a schema YAML")
    p.add_argument("--data-dir", help="folder of the data set (movielens-100k)")

    p = sub.add_parser("candidates", help="fit the candidate sources (implicit ALS and others)")
    _common(p)

    p = sub.add_parser("train", help="fine-tune the ranker on Ray Train and publish a model version")
    _common(p)
    p.add_argument("--num-workers", type=int, help="Ray Train workers (DDP)")
    p.add_argument("--gpu", action="store_true", help="train on GPUs (one per worker)")

    p = sub.add_parser("tune", help="Ray Tune search over a search space; promotes the best trial")
    _common(p)
    p.add_argument("--space", required=True, help="search space YAML, e.g. tune_configs/ranker.yaml")
    p.add_argument("--num-samples", type=int)
    p.add_argument("--max-concurrent", type=int)

    p = sub.add_parser("evaluate", help="metrics.json, predictions and the report")
    _common(p)

    p = sub.add_parser("serve", help="deploy the run's model version on Ray Serve")
    _common(p)
    p.add_argument("--port", type=int)
    p.add_argument("--host")

    sub.add_parser("online", add_help=False,
                   help="the online learner on the run's feedback log (see `adrec online --help`)")

    p = sub.add_parser("demo", help="the whole flow on a local Ray, then real HTTP requests")
    _common(p, run_required=False)
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--data-dir")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--users", type=int, default=3, help="users to request recommendations for")
    return ap


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("urllib3", "filelock", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _overrides(args) -> list[str]:
    o = list(args.overrides)
    if getattr(args, "dataset", None):
        o.append(f"data.dataset={args.dataset}")
    if getattr(args, "data_dir", None):
        o.append(f"data.data_dir={Path(args.data_dir).expanduser().resolve()}")
    if getattr(args, "address", None):
        o.append(f"ray.address={args.address}")
    if getattr(args, "num_workers", None):
        o.append(f"ranker.num_workers={args.num_workers}")
    if getattr(args, "gpu", False):
        o.append("ranker.use_gpu=true")
    if getattr(args, "port", None):
        o.append(f"serve.port={args.port}")
    if getattr(args, "host", None):
        o.append(f"serve.host={args.host}")
    return o


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["online"]:  # the learner has its own options: hand them over untouched
        from adrec.online.__main__ import main as online_main

        return online_main(argv[1:])
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    from adrec import flow

    try:
        if args.command == "demo":
            from adrec.demo import run_demo

            return run_demo(args.run, args.config, _overrides(args), users=args.users)
        run = RunDir(args.run)
        cfg = flow.resolve_config(run, args.config, _overrides(args), fresh=args.command == "prepare")
        t0 = time.perf_counter()
        if args.command == "prepare":
            out = flow.prepare(cfg, run)
        elif args.command == "candidates":
            out = flow.candidates(cfg, run)
        elif args.command == "train":
            out = flow.train(cfg, run)
        elif args.command == "tune":
            from adrec.tuning import tune_from_cli

            out = tune_from_cli(cfg, run, args.space, num_samples=args.num_samples, max_concurrent=args.max_concurrent)
        elif args.command == "evaluate":
            out = flow.evaluate(cfg, run)
            print(flow_metrics_text(out, run))
        elif args.command == "serve":
            from adrec.serving.deploy import serve_run

            out = serve_run(cfg, run, blocking=True)
        log.info("%s finished in %.1fs", args.command, time.perf_counter() - t0)
        if args.command not in ("evaluate", "serve") and isinstance(out, dict):
            print(json.dumps(out, indent=2, default=str))
        return 0
    except (ConfigError, DataError, RunError) as err:
        print(f"adrec {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"adrec {args.command}: interrupted", file=sys.stderr)
        return 130


def flow_metrics_text(metrics: dict, run: RunDir) -> str:
    from adrec.evaluation.stage import metrics_table

    return f"{metrics_table(metrics)}\n\nreport: {run.report / 'report.md'}"


if __name__ == "__main__":
    sys.exit(main())
