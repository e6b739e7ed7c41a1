"""Search-space files (``tune_configs/*.yaml``): loading, validation, and Tune's param space.

A space file is a base config plus the keys to search, each a dotted :class:`AdrecConfig` path::

    trainable: ranker                 # ranker (Ray Train inside Tune) or als (candidate ALS)
    base: {ranker: {epochs: 3}}       # merged over the run's config for every trial
    space:
      ranker.lr: {loguniform: [1.0e-4, 1.0e-2]}
      ranker.embed_dim: {choice: [16, 32]}
      ranker.dropout: {uniform: [0.0, 0.3]}
      ranker.cross_layers: {grid: [1, 2]}   # every value, times num_samples
    metric: valid_auc
    mode: max
    num_samples: 4
    max_concurrent: 1                 # omitted: as many trials as the cluster's CPUs/GPUs hold
    scheduler: {asha: {grace_period: 1, max_t: 3, reduction_factor: 2}}   # or fifo
    resources_per_trial: {cpu: 1, gpu: 0}   # per training worker; gpu may be fractional
    seed: 0                           # sampling seed (null: a different search each time)

Everything is checked before any trial starts: an unknown top-level key, an unknown config key in
``base`` or ``space`` (named, with its path), a key the trainable cannot change, a sampler that is
not one of ``choice``, ``grid``, ``uniform``, ``loguniform``, ``randint``, a value the config would
reject (each choice and grid value, and both ends of each range, are validated), and a metric the
trainable never reports all raise :class:`adrec.config.ConfigError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adrec.config import AdrecConfig, build_config, deep_merge

from adrec.errors import ConfigError

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")

SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint")

# What each trainable reports to Tune (the metrics a space may select on) and which config
# sections a trial actually re-runs (a key outside them would change nothing).
TRAINABLES: dict[str, dict[str, Any]] = {
    "ranker": {
        "metrics": ("valid_auc", "valid_logloss", "train_loss", "best_auc"),
        "default_metric": "valid_auc",
        "sections": ("ranker",),
        # ASHA's clock: the ranker reports once per epoch (also right after a resumed trial).
        "time_attr": "epoch",
        # Set by the search itself: trials skip the refit, resources come from resources_per_trial,
        # checkpoints live in the trial's folder.
        "fixed": ("ranker.refit", "ranker.use_gpu", "ranker.storage_path", "ranker.resume",
                  "ranker.max_failures", "ranker.placement_strategy"),
    },
    "als": {
        "metrics": ("valid_recall@100", "valid_ndcg@10", "valid_recall@10", "valid_precision@10",
                    "valid_map@10", "valid_hitrate@10", "valid_coverage@10"),
        "default_metric": "valid_recall@100",
        "sections": ("candidates",),
        "time_attr": "training_iteration",
        "fixed": ("candidates.use_gpu",),
    },
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Resources(_Strict):
    """What one training worker of a trial reserves (the ranker runs ``ranker.num_workers`` of them)."""

    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)


class AshaSpec(_Strict):
    grace_period: int = Field(1, ge=1)
    max_t: int | None = Field(None, ge=1)  # None: the largest ranker.epochs a trial can get
    reduction_factor: float = Field(2.0, gt=1)
    brackets: int = Field(1, ge=1)


class TuneSpec(_Strict):
    """A validated search-space file."""

    trainable: Literal["ranker", "als"] = "ranker"
    name: str | None = None  # experiment folder under RUN/tune (default: the file's stem)
    base: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Any]
    metric: str | None = None
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(1, ge=1)
    max_concurrent: int | None = Field(None, ge=1)
    # {asha: {...}}, "asha", "fifo" or null (fifo); checked by parse_space.
    scheduler: Any = None
    resources_per_trial: Resources = Resources()
    seed: int | None = 0

    @property
    def info(self) -> dict[str, Any]:
        return TRAINABLES[self.trainable]

    @property
    def metric_name(self) -> str:
        return self.metric or self.info["default_metric"]

    @property
    def asha(self) -> AshaSpec | None:
        """The ASHA settings, or None for a plain FIFO search."""
        s = self.scheduler
        if s == "asha":
            return AshaSpec()
        if isinstance(s, dict) and "asha" in s:
            return AshaSpec.model_validate(s["asha"] or {})
        return None

    def grid_size(self) -> int:
        n = 1
        for dom in self.space.values():
            if "grid" in dom:
                n *= len(dom["grid"])
        return n

    def expected_trials(self) -> int:
        """How many trials the search runs: num_samples times the size of the grid."""
        return self.num_samples * self.grid_size()

    def fingerprint(self, extra: str = "") -> str:
        """Identifies the search (space, base, counts, scheduler): a rerun with the same one resumes."""
        d = self.model_dump(exclude={"max_concurrent", "name"})
        return hashlib.sha256((json.dumps(d, sort_keys=True, default=str) + extra).encode()).hexdigest()[:16]


# ---- key paths ------------------------------------------------------------------------------------------
def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        sub = _submodel(arg)
        if sub is not None:
            return sub
    return None


def _is_mapping(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is dict:
        return True
    return any(_is_mapping(a) for a in typing.get_args(annotation))


def check_key_path(path: str, where: str) -> None:
    """Raise :class:`ConfigError` naming ``path`` unless it is a leaf of :class:`AdrecConfig`."""
    parts = path.split(".")
    if not path or any(not p for p in parts):
        raise ConfigError(f"{where}: '{path}' is not a dotted config key such as ranker.lr")
    model: type[BaseModel] | None = AdrecConfig
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        fields = model.model_fields
        if part not in fields:
            hint = ", ".join(sorted(fields))
            raise ConfigError(f"{where}: unknown key '{here}' (the config has no such key; "
                              f"{'.'.join(parts[:i]) or 'the top level'} has: {hint})")
        ann = fields[part].annotation
        rest = parts[i + 1:]
        if not rest:
            if _submodel(ann) is not None and not _is_mapping(ann):
                raise ConfigError(f"{where}: '{here}' is a section; name one of its keys, e.g. {here}."
                                  f"{next(iter(_submodel(ann).model_fields))}")
            return
        sub = _submodel(ann)
        if sub is None:
            if _is_mapping(ann) and len(rest) == 1:  # e.g. candidates.quotas.als
                return
            raise ConfigError(f"{where}: unknown key '{path}' ('{here}' is a value, not a section)")
        model = sub


def _nest(path: str, value: Any) -> dict[str, Any]:
    node: dict[str, Any] = {}
    cur = node
    parts = path.split(".")
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value
    return node


def _plain(value: Any) -> Any:
    """numpy scalars (what some samplers return) -> Python scalars, so pydantic and JSON take them."""
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (list, dict, str)):
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    return value


def apply_params(base: dict[str, Any], params: dict[str, Any], source: str = "trial") -> AdrecConfig:
    """The trial's config: ``base`` (a full config dict) with the sampled dotted keys set."""
    data = base
    for path, value in params.items():
        data = deep_merge(data, _nest(path, _plain(value)))
    return build_config(data, source=source)


# ---- samplers -------------------------------------------------------------------------------------------
def _domain_values(path: str, dom: Any, where: str) -> tuple[str, list[Any]]:
    """(kind, the values to validate against the config) of one space entry."""
    if not isinstance(dom, dict) or len(dom) != 1:
        raise ConfigError(f"{where}: space key '{path}' must map to one sampler, e.g. "
                          f"{{loguniform: [1.0e-4, 1.0e-2]}}; samplers: {', '.join(SAMPLERS)}")
    kind, arg = next(iter(dom.items()))
    if kind not in SAMPLERS:
        raise ConfigError(f"{where}: space key '{path}' uses unknown sampler '{kind}' "
                          f"(samplers: {', '.join(SAMPLERS)})")
    if not isinstance(arg, list) or not arg:
        raise ConfigError(f"{where}: space key '{path}': {kind} needs a non-empty list")
    if kind in ("choice", "grid"):
        return kind, list(arg)
    if len(arg) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in arg):
        raise ConfigError(f"{where}: space key '{path}': {kind} needs [low, high] numbers, got {arg}")
    lo, hi = arg
    if not lo < hi:
        raise ConfigError(f"{where}: space key '{path}': {kind} needs low < high, got {arg}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: space key '{path}': loguniform needs low > 0, got {lo}")
    if kind == "randint":
        if not all(isinstance(v, int) for v in arg):
            raise ConfigError(f"{where}: space key '{path}': randint needs integers, got {arg}")
        return kind, [lo, hi - 1]  # Tune's randint excludes the upper bound
    return kind, [float(lo), float(hi)]


def to_param_space(spec: TuneSpec) -> dict[str, Any]:
    """Tune's param space: flat dotted keys (``ranker.lr``) -> Tune samplers."""
    from ray import tune

    out: dict[str, Any] = {}
    for path, dom in spec.space.items():
        kind, arg = next(iter(dom.items()))
        if kind == "choice":
            out[path] = tune.choice(arg)
        elif kind == "grid":
            out[path] = tune.grid_search(arg)
        elif kind == "uniform":
            out[path] = tune.uniform(float(arg[0]), float(arg[1]))
        elif kind == "loguniform":
            out[path] = tune.loguniform(float(arg[0]), float(arg[1]))
        elif kind == "randint":
            out[path] = tune.randint(int(arg[0]), int(arg[1]))
    return out


# ---- loading --------------------------------------------------------------------------------------------
def _describe(err: ValidationError, where: str) -> str:
    lines = [f"invalid search space {where}:"]
    allowed = ", ".join(TuneSpec.model_fields)
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            if len(e["loc"]) == 1:
                lines.append(f"  unknown key '{loc}' (a space file has: {allowed})")
            else:
                lines.append(f"  unknown key '{loc}'")
        else:
            lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def _check_scheduler(s: Any, source: str) -> None:
    if s is None or s in ("asha", "fifo"):
        return
    if isinstance(s, dict) and len(s) == 1:
        kind, opts = next(iter(s.items()))
        if kind == "fifo" and not opts:
            return
        if kind == "asha":
            if opts is not None and not isinstance(opts, dict):
                raise ConfigError(f"{source}: scheduler.asha must be a mapping, e.g. {{grace_period: 1, max_t: 3}}")
            try:
                AshaSpec.model_validate(opts or {})
            except ValidationError as err:
                lines = [f"invalid search space {source}:"]
                for e in err.errors():
                    loc = "scheduler.asha." + ".".join(str(p) for p in e["loc"])
                    if e["type"] == "extra_forbidden":
                        lines.append(f"  unknown key '{loc}' (asha has: {', '.join(AshaSpec.model_fields)})")
                    else:
                        lines.append(f"  {loc}: {e['msg']}")
                raise ConfigError("\n".join(lines)) from None
            return
    raise ConfigError(f"{source}: scheduler must be {{asha: {{grace_period: 1, max_t: 3}}}}, asha or fifo; got {s!r}")


def parse_space(data: Any, cfg: AdrecConfig | None = None, source: str = "(inline space)",
                default_name: str | None = None) -> tuple[TuneSpec, dict]:
    """Validate a loaded space mapping; returns the spec and the merged base config dict.

    ``cfg`` is the run's config (the base is merged over it); defaults when None. The search's name
    (its folder under RUN/tune) is the file's ``name``, else ``default_name``, else the trainable.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping at the top level")
    try:
        spec = TuneSpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None
    if spec.name is not None and (not _NAME_RE.match(spec.name) or spec.name in (".", "..")):
        raise ConfigError(f"{source}: name '{spec.name}' must use only letters, digits, '_', '-', '.'")
    if not spec.space:
        raise ConfigError(f"{source}: 'space' is empty: name at least one key to search")
    if spec.name is None:
        name = default_name if default_name and _NAME_RE.match(default_name) else spec.trainable
        spec = spec.model_copy(update={"name": name})
    info = spec.info

    # The base: unknown keys are named by build_config ("unknown key 'ranker.lrr'").
    run_dict = (cfg or AdrecConfig()).to_dict()
    base_cfg = build_config(deep_merge(run_dict, spec.base), source=f"{source} (base)")
    base = base_cfg.to_dict()

    for path, dom in spec.space.items():
        check_key_path(path, f"{source}: space")
        section = path.split(".", 1)[0]
        if section not in info["sections"]:
            raise ConfigError(f"{source}: space key '{path}' cannot be searched by the {spec.trainable} trainable: "
                              f"a trial re-runs only {', '.join(s + '.*' for s in info['sections'])}")
        if path in info["fixed"]:
            raise ConfigError(f"{source}: space key '{path}' cannot be searched: the {spec.trainable} search sets it "
                              f"itself (refit, resources and storage are not hyperparameters)")
        kind, values = _domain_values(path, dom, source)
        for v in values:
            apply_params(base, {path: v}, source=f"{source}: space key '{path}' value {v!r}")

    metric = spec.metric_name
    if metric not in info["metrics"]:
        raise ConfigError(f"{source}: metric '{metric}' is not reported by the {spec.trainable} trainable "
                          f"(it reports: {', '.join(info['metrics'])})")
    _check_scheduler(spec.scheduler, source)
    asha = spec.asha
    if asha is not None and asha.max_t is not None and asha.max_t < asha.grace_period:
        raise ConfigError(f"{source}: scheduler.asha.max_t ({asha.max_t}) < grace_period ({asha.grace_period})")
    if spec.resources_per_trial.gpu > 1 and not float(spec.resources_per_trial.gpu).is_integer():
        raise ConfigError(f"{source}: resources_per_trial.gpu above 1 must be a whole number, "
                          f"got {spec.resources_per_trial.gpu}")
    return spec, base


def load_space(path: str | Path, cfg: AdrecConfig | None = None) -> tuple[TuneSpec, dict]:
    """Read and validate a space file; returns the spec and the merged base config (a dict)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"search space {p} does not exist (see tune_configs/ for examples)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"search space {p} is not valid YAML: {err}") from None
    return parse_space(data if data is not None else {}, cfg, source=str(p), default_name=p.stem)


def ranker_max_t(spec: TuneSpec, base: dict) -> int | None:
    """ASHA's max_t for a ranker search (the most epochs a trial runs); None without ASHA."""
    asha = spec.asha
    if asha is None or spec.trainable != "ranker":
        return None
    return asha.max_t or max_epochs(spec, base)


def trial_config(spec: TuneSpec, base: dict, params: dict[str, Any], source: str = "trial config") -> AdrecConfig:
    """The config a trial trains with (and the one promoted when it wins).

    Ranker trials run only the selection phase of ``adrec train`` (``ranker.refit: false``: Tune
    compares trials on the validation split, which a refit would train on) and at most ASHA's max_t
    epochs (so that a trial reaching it ends on its own).
    """
    cfg = apply_params(base, params, source=source)
    if spec.trainable == "ranker":
        fixes: dict[str, Any] = {"ranker.refit": False} if "refit" in type(cfg.ranker).model_fields else {}
        cap = ranker_max_t(spec, base)
        if cap and cfg.ranker.epochs > cap:
            fixes["ranker.epochs"] = cap
        if fixes:
            cfg = apply_params(cfg.to_dict(), fixes, source=source)
    return cfg


def max_epochs(spec: TuneSpec, base: dict) -> int:
    """The most epochs any ranker trial can run (ASHA's default max_t)."""
    dom = spec.space.get("ranker.epochs")
    if dom is None:
        return int(base["ranker"]["epochs"])
    kind, arg = next(iter(dom.items()))
    if kind in ("choice", "grid"):
        return int(max(arg))
    return int(math.ceil(arg[1]))
