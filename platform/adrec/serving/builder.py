"""Building the Ray Serve application (:func:`build_app`): ingress -> candidates -> ranker, and the feedback writer.

Two topologies (``AppArgs.topology``), the same answers and the same HTTP API:

``graph`` (every arrow is a :class:`DeploymentHandle` call)::

    HTTP -> Ingress (FastAPI: auth, body limits, strict validation, pseudonymization)
              |-- /recommend -> CandidateDeployment --rank/explain--> RankerDeployment (@serve.batch)
              |-- /feedback  -> FeedbackDeployment (durable log, idempotent by event_id: adrec.feedback)
              |-- /version   -> CandidateDeployment
              `-- /healthz

``fused``: the Ingress replica holds the model version itself (candidates and the ranker, ranking
batched across its concurrent requests with ``@serve.batch``); only ``/feedback`` leaves it, for
the single writer. Each handle hop costs several ms of CPU on both sides, so on a small machine the
fused app answers at a fraction of the graph's CPU per request; the graph scales the stages apart
(more ranker replicas than candidate replicas) on a cluster. Replicas, rollout and faults work
the same way in both: scale the Ingress to scale a fused app.

- The modules: :mod:`~adrec.serving.args` (settings and secrets), :mod:`~adrec.serving.holder` (the
  version swap), :mod:`~adrec.serving.deployments` (ranker, candidates, feedback),
  :mod:`~adrec.serving.ingress` (the FastAPI app), :mod:`~adrec.serving.request` (the request
  algorithm every topology runs) and this builder.
- The ranker replica holds a :class:`~adrec.serving.recommender.Recommender` whose Ranker caches the
  item text embeddings once per model version; each request runs only the ranking head over its
  candidates. Concurrent requests are batched into one ``predict`` call (``@serve.batch``).
- The model version is the deployments' ``user_config`` (``{"model_dir": ..., "version": ...}``):
  a new one is loaded by ``reconfigure`` next to the old (in a thread: requests keep flowing on the
  old one) and swapped in atomically. Rank calls carry the candidate side's version id, and the ranker
  keeps the previous version too (or loads the requested one), so the two halves never mix versions
  while a rollout is half done.
- Raw user ids stop at the ingress: it pseudonymizes them with the data set's key; the other
  deployments, the feedback log and every log line see pseudonyms only.
- Client errors are :class:`ApiError` (4xx with a message); failures inside the graph answer 503.
"""

from ray import serve

from adrec.errors import ConfigError
from adrec.serving.args import AppArgs
from adrec.serving.deployments import CandidateDeployment, FeedbackDeployment, RankerDeployment
from adrec.serving.exposure import require_api_key, serve_http_address
from adrec.serving.holder import model_config
from adrec.serving.ingress import Ingress
from adrec.storage import is_remote


def _options(deployment, settings: AppArgs, version: str, user_config: dict | None, **extra):
    opts = dict(max_ongoing_requests=settings.max_ongoing_requests, ray_actor_options={"num_cpus": settings.num_cpus_per_replica},
                user_config=user_config, logging_config={"enable_access_log": settings.access_log}, **extra)
    if settings.max_replicas_per_node:
        opts["max_replicas_per_node"] = settings.max_replicas_per_node
    try:  # a stable code version: a changed user_config is then a reconfigure in place, not new replicas
        return deployment.options(version=version, _internal=True, **opts)
    except TypeError:  # a Ray without the internal flag: rollouts restart replicas (rolling, still no drops)
        return deployment.options(**opts)


def build_app(args: AppArgs) -> serve.Application:
    """The application for ``serve.run`` / ``serve run`` / ``serve deploy`` (a typed builder)."""
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args)
    args = args.resolved()
    # Before anything is read or placed: Serve's http_options.host decides who can reach the app.
    require_api_key(args, *serve_http_address(args.host, args.port))
    if args.feedback_replicas > 1 and not is_remote(args.feedback_log):
        raise ConfigError(f"serve.feedback_replicas={args.feedback_replicas}, but the feedback log {args.feedback_log} "
                          "is a local file, which has one writer: use 1, or put the log on a shared store "
                          "(serve.feedback_log=s3://bucket/prefix/feedback), where every replica writes its own segments")
    if args.feedback_writer == "ingress" and (args.topology != "fused" or not is_remote(args.feedback_log)):
        raise ConfigError("serve.feedback_writer=ingress makes every Ingress replica a writer of the feedback log: it "
                          "needs the fused topology (serve.topology=fused; the replica then knows the version's items) "
                          f"and a segment log on a shared store (serve.feedback_log=s3://...), not {args.feedback_log} "
                          f"with topology {args.topology}: use feedback_writer=auto or deployment")
    user_config = model_config(args.model_dir)
    # The deployments get every setting except the model folder: that is the user_config, so pointing
    # the app at a new version changes nothing else, and Serve reconfigures the replicas in place.
    settings = args.model_copy(update={"model_dir": "(user_config)"})
    version = args.fingerprint()
    if args.ranker_max_replicas and args.ranker_max_replicas > args.ranker_replicas:
        scale = {"autoscaling_config": {"min_replicas": args.ranker_replicas, "max_replicas": args.ranker_max_replicas,
                                        "target_ongoing_requests": max(2, args.max_batch_size)}}
    else:
        scale = {"num_replicas": args.ranker_replicas}
    feedback = _options(FeedbackDeployment, args, version, user_config, num_replicas=args.feedback_replicas).bind(settings)
    if args.topology == "fused":
        # The ingress holds the model: it takes the ranker's scaling (and the model version as user_config).
        if "num_replicas" in scale:
            scale["num_replicas"] = max(args.ingress_replicas, args.ranker_replicas)
        return _options(Ingress, args, version, user_config, **scale).bind(settings, None, feedback)
    ranker = _options(RankerDeployment, args, version, user_config, **scale).bind(settings)
    candidates = _options(CandidateDeployment, args, version, user_config,
                          num_replicas=args.candidate_replicas).bind(settings, ranker)
    return _options(Ingress, args, version, None, num_replicas=args.ingress_replicas).bind(settings, candidates, feedback)
