"""``adrec``: each stage of the flow as a command on a run folder, plus the whole demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time

import adrec
from adrec import storage
from adrec.errors import ConfigError, DataError, LearnerFailedError, RunError, UnsafeFileError
from adrec.run import RunDir, resolve_config

log = logging.getLogger("adrec.cli")


def env_expanded(value: str) -> str:
    """``$VAR`` / ``${VAR}`` in a location (``--run``, ``--data-dir``) expanded from this process's environment;
    an unset one is an error.

    So a job names the bucket the cluster's nodes were given: ``ray job submit ... --run '$ADREC_STORE/runs/r1'``
    (single quotes: `ray job submit` passes the argument on as typed, and the job expands it on the cluster).
    """
    out = os.path.expandvars(value)
    left = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", out)
    if left:
        raise argparse.ArgumentTypeError(f"{value!r} names ${left[0]}, which is not set here (cluster.yaml exports "
                                         f"ADREC_STORE on every node; elsewhere export it first)")
    return out


def _common(p: argparse.ArgumentParser, run_required: bool = True) -> None:
    p.add_argument("--run", required=run_required, metavar="DIR_OR_URI", type=env_expanded,
                   help="the run: a folder or an object-store URI (s3://bucket/runs/r1, gs://...); prepare "
                        "creates it, every later stage reads and writes it ($VARS are expanded, e.g. "
                        "'$ADREC_STORE/runs/r1')")
    p.add_argument("--config", metavar="FILE",
                   help="YAML config (default: the run's config.yaml, else the built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set ranker.epochs=2 (repeatable; unknown keys are errors)")
    p.add_argument("--address", metavar="ADDR",
                   help="Ray address of a running cluster, e.g. auto or ray://head:10001 (default: start Ray in-process)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (the demo: show every log line)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="adrec", description="Personalized ad recommendation on Ray.")
    ap.add_argument("--version", action="version", version=f"adrec {adrec.__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="validate, pseudonymize and encode the raw logs (Ray Data)")
    _common(p)
    p.add_argument("--dataset", metavar="NAME_OR_YAML",
                   help="synthetic (the built-in ad log), movielens-100k, or a schema YAML of your own data")
    p.add_argument("--data-dir", metavar="DIR", type=env_expanded,
                   help="folder of the data set's files: where a schema YAML's paths resolve (else the YAML's "
                        "folder); movielens-100k: the unpacked ml-100k folder")

    p = sub.add_parser("candidates", help="fit the candidate sources (implicit ALS and others) and the two-stage top-K")
    _common(p)

    p = sub.add_parser("train", help="fine-tune the ranker on Ray Train and publish a model version")
    _common(p)
    p.add_argument("--num-workers", type=int, metavar="N", help="Ray Train workers (data-parallel DDP)")
    p.add_argument("--gpu", action="store_true", help="train on GPUs (one per worker)")

    p = sub.add_parser("tune", help="Ray Tune search over a search space; promotes the best trial")
    _common(p)
    p.add_argument("--space", required=True, metavar="FILE", help="search space YAML, e.g. tune_configs/ranker.yaml")
    p.add_argument("--num-samples", type=int, metavar="N", help="trials to sample (default: the space's num_samples)")
    p.add_argument("--max-concurrent", type=int, metavar="N",
                   help="trials running at once (default: the space's max_concurrent)")

    p = sub.add_parser("evaluate", help="metrics.json, predictions and the report")
    _common(p)

    p = sub.add_parser("serve", help="deploy the run's model version on Ray Serve (blocks until Ctrl-C)")
    _common(p)
    p.add_argument("--port", type=int, metavar="PORT", help="HTTP port (default: serve.port, 8000)")
    p.add_argument("--host", metavar="HOST", help="HTTP host to listen on (default: serve.host, 127.0.0.1)")
    p.add_argument("--detach", action="store_true",
                   help="deploy and return: the app keeps running on the cluster (for `ray job submit`)")

    p = sub.add_parser("online", help="the online learner on the run's feedback log, in the foreground")
    _common(p)
    p.add_argument("--rollout", action="store_true",
                   help="roll every published version out to the run's Serve app (on the Ray at ray.address)")
    p.add_argument("--once", action="store_true", help="consume what the log holds now, then exit")
    p.add_argument("--flush", action="store_true",
                   help="with --once: label the impressions still inside their attribution window before exiting")

    p = sub.add_parser("score", help="batch scoring: every user's top-K from the live version, as Parquet (Ray Data)")
    _common(p)
    p.add_argument("--users", default="all", metavar="FILE|all",
                   help="all (every user the version knows, default) or a text file of raw user ids, one per line")
    p.add_argument("--out", required=True, metavar="DIR_OR_URI", help="where the Parquet lists go (folder or URI)")
    p.add_argument("--k", type=int, default=10, metavar="K", help="items per user (default 10)")
    p.add_argument("--actors", type=int, default=1, metavar="N", help="actors holding the model (default 1)")

    p = sub.add_parser("evaluate-policy", help="off-policy evaluation: a version's CTR estimated on the logged feedback "
                                               "(IPS, SNIPS, doubly robust, bootstrap intervals)")
    _common(p)
    p.add_argument("--version", dest="model_version", required=True, metavar="N_OR_ID",
                   help="the candidate model version: its number (`adrec versions list`) or id")
    p.add_argument("--log", metavar="PATH_OR_URI", type=env_expanded,
                   help="the feedback log (default: serve.feedback_log, else the run's own)")
    p.add_argument("--out", metavar="DIR_OR_URI", type=env_expanded,
                   help="where policy_eval.json and policy_eval.png go (default: RUN/report/policy_eval/N)")
    p.add_argument("--epsilon", type=float, default=0.0, metavar="E",
                   help="smooth the version's top-K: any remaining item with probability E at each position (default 0)")
    p.add_argument("--n-boot", type=int, default=1000, metavar="N", help="bootstrap resamples (default 1000)")
    p.add_argument("--level", type=float, default=0.95, metavar="L", help="interval level (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--skip-unlogged", action="store_true",
                   help="leave out impressions logged without a propensity (exploration switched on part-way)")

    p = sub.add_parser("versions", help="the run's model versions: list, show one, roll back, prune")
    _common(p)
    p.add_argument("action", choices=("list", "show", "rollback", "prune"))
    p.add_argument("number", nargs="?", type=int, help="show: the version (default: the live one)")
    p.add_argument("--to", type=int, metavar="N", help="rollback: the version to make live (default: the previous one)")
    p.add_argument("--keep", type=int, default=5, metavar="N",
                   help="prune: keep the newest N (the live version and the one before it are always kept)")

    p = sub.add_parser("ab-report", help="A/B arms of the feedback log: CTR (and CVR) with intervals and a verdict")
    _common(p)
    p.add_argument("--log", metavar="URI", type=env_expanded, help="the feedback log (default: the run's, serve.feedback_log)")
    p.add_argument("--alpha", type=float, default=0.05, metavar="A", help="significance level (default 0.05)")

    p = sub.add_parser("demo", help="the whole flow on a local Ray, then real HTTP requests")
    _common(p, run_required=False)
    p.add_argument("--dataset", default="synthetic", metavar="NAME_OR_YAML",
                   help="synthetic (default), movielens-100k, or a schema YAML")
    p.add_argument("--data-dir", metavar="DIR", type=env_expanded, help="folder of the data set's files (a schema YAML's paths resolve there; movielens-100k)")
    p.add_argument("--port", type=int, default=8000, metavar="PORT", help="HTTP port of the demo's Serve app")
    p.add_argument("--users", type=int, default=3, metavar="N", help="known users to request recommendations for")
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
        o.append(f"data.data_dir={storage.normalize(args.data_dir)}")
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
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.command != "demo":  # the demo sends its log lines to a file of the run (adrec.demo)
        _configure_logging(args.verbose)
    from adrec import flow

    try:
        if args.command == "demo":
            from adrec.demo import run_demo

            return run_demo(args.run, args.config, _overrides(args), users=args.users, verbose=args.verbose)
        run = RunDir(args.run)
        if args.command == "versions":
            print(versions_command(run, args))
            return 0
        cfg = resolve_config(run, args.config, _overrides(args), fresh=args.command == "prepare")
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

            out = serve_run(cfg, run, blocking=not args.detach)
        elif args.command == "score":
            from adrec.serving.batch import score

            out = score(cfg, run, args.out, users=args.users, k=args.k, actors=args.actors)
        elif args.command == "evaluate-policy":
            from adrec.evaluation.policy_eval import evaluate_policy, report_text

            out = evaluate_policy(cfg, run, args.model_version, args.log, args.out, epsilon=args.epsilon,
                                  n_boot=args.n_boot, level=args.level, seed=args.seed,
                                  skip_unlogged=args.skip_unlogged)
            print(report_text(out))
        elif args.command == "ab-report":
            from adrec.evaluation.abtest import ab_report_command

            out = ab_report_command(cfg, run, args.log, args.alpha)[1]  # the table (the JSON goes to the run's report)
            print(out)
        elif args.command == "online":
            from adrec.online.foreground import run_learner

            out = run_learner(cfg, run, rollout=args.rollout, once=args.once, flush=args.flush)
        log.info("%s finished in %.1fs", args.command, time.perf_counter() - t0)
        if args.command == "serve" and args.detach:
            print(f"adrec serving at {out} (detached: the app runs on until `serve shutdown`)", flush=True)
        if args.command not in ("evaluate", "serve", "evaluate-policy") and isinstance(out, dict):
            print(json.dumps(out, indent=2, default=str))
        return 0
    except (ConfigError, DataError, RunError, UnsafeFileError) as err:
        print(f"adrec {args.command}: error: {err}", file=sys.stderr)
        return 2
    except LearnerFailedError as err:
        print(f"adrec {args.command}: error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"adrec {args.command}: interrupted", file=sys.stderr)
        return 130


def versions_command(run: RunDir, args) -> str:
    """``adrec versions``: the text it prints (a table, one version's manifest, or what changed)."""
    from adrec.model_version import registry_of

    reg = registry_of(run.location)
    if args.action == "rollback":
        rec = reg.rollback(args.to)
        return f"live: version {rec['number']} ({rec['version']}); previous: {rec['previous']}"
    if args.action == "prune":
        removed = reg.prune(args.keep)
        return f"removed {len(removed)} version(s): {removed}" if removed else "nothing to remove"
    if args.action == "show":
        entry = reg.entry(args.number) if args.number else reg.live()
        return json.dumps({"number": entry.number, "uri": entry.uri, **entry.manifest}, indent=2)
    live = reg.live_record() or {}
    rows = ["| number | version | created | files | MB | |", "|---:|---|---|---:|---:|---|"]
    for e in reg.entries():
        mark = "live" if e.number == live.get("number") else ("previous" if e.number == live.get("previous") else "")
        rows.append(f"| {e.number} | {e.version} | {e.manifest.get('created') or ''} | {len(e.manifest['files'])} "
                    f"| {e.manifest['bytes'] / 1e6:.1f} | {mark} |")
    if len(rows) == 2:
        return f"{reg.location.uri}: no committed versions yet (run `adrec train --run {run.uri}`)"
    return "\n".join([f"versions of {run.uri}", ""] + rows)


def flow_metrics_text(metrics: dict, run: RunDir) -> str:
    from adrec.evaluation.stage import metrics_table

    where = run.store('report/report.md').uri if run.remote else run.report / 'report.md'
    return f"{metrics_table(metrics)}\n\nreport: {where}"


if __name__ == "__main__":
    sys.exit(main())
