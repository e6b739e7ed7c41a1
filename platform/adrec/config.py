"""One typed configuration for every stage.

The CLI, the pipelines, the Serve app and Tune all take an :class:`AdrecConfig`.
Every model forbids unknown keys, so a typo in a YAML file or an override fails
loudly with the offending key's name instead of being silently ignored.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from adrec.errors import ConfigError
from adrec.keys import (API_KEY_FILE, PSEUDONYM_KEY_FILE, SECRETS_DIR, check_not_empty, is_fingerprint,
                        key_fingerprint, store_secret)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(_Strict):
    """Size and shape of the embedded synthetic ad log."""

    n_users: int = Field(2000, ge=10)
    n_ads: int = Field(400, ge=10)
    n_impressions: int = Field(60_000, ge=100)
    n_advertisers: int = Field(40, ge=2)
    days: int = Field(30, ge=1)
    base_ctr: float = Field(0.08, gt=0, lt=1)
    position_bias: float = Field(0.35, ge=0, lt=1)
    # Preferences shift at this fraction of the timeline (0 disables drift).
    drift_at: float = Field(0.0, ge=0, lt=1)
    seed: int = 0
    # Conversions behind the clicks (issue 17): a ``converted`` column named as the schema's conversion label,
    # drawn given a click from user and ad features the click does not depend on (adrec.data.synthetic).
    conversions: bool = True
    base_cvr: float = Field(0.2, gt=0, lt=1)  # the conversion rate of a click with every term at zero
    # None: one impressions.csv. A number: the log is written as Parquet shards of that many impressions,
    # one shard in memory at a time (for logs larger than memory; read with features.pipeline: streaming).
    shard_rows: int | None = Field(None, ge=100)


class DataConfig(_Strict):
    """Where the raw logs come from and how strictly they are read."""

    dataset: str = "synthetic"  # "synthetic", "movielens-100k" or a path to a schema YAML
    data_dir: str | None = None
    synthetic: SyntheticConfig = SyntheticConfig()
    # Rows that fail to parse are an error unless this many may be skipped (and counted).
    max_bad_rows: int = Field(0, ge=0)
    # Key for the keyed hash that pseudonymizes user ids. Falls back to $ADREC_PSEUDONYM_KEY, then to the
    # run's secrets/pseudonym.key. A literal key here is moved into that file (mode 0600) when the config
    # is saved, and the saved config holds its fingerprint ("sha256:..."): a fingerprint here means "the
    # key must come from the environment or the secrets file, and must be this one". Empty: an error.
    pseudonym_key: str | None = None

    @field_validator("pseudonym_key")
    @classmethod
    def _key_not_empty(cls, v: str | None) -> str | None:
        check_not_empty(v, "data.pseudonym_key")
        return v


class CrossSpec(_Strict):
    """A hashed pairwise cross of two fields, e.g. ``[user.age, item.category]``."""

    fields: tuple[str, str]
    hash_size: int = Field(1024, ge=2)

    @property
    def name(self) -> str:
        return "x:" + "*".join(self.fields)


class FeatureConfig(_Strict):
    numeric_buckets: int = Field(8, ge=2)
    # None: the crosses that suit the built-in data set (see adrec.data.sources.DEFAULT_CROSSES).
    crosses: list[CrossSpec] | None = None
    # How many of the user's most recent earlier positives feed the history features. 50 rather than 10:
    # the ranker's valid AUC on MovieLens-100k is higher with it (docs/benchmarks.md, "Ranker variants").
    history_len: int = Field(50, ge=0)
    # Vocabulary entries seen fewer times than this map to the unknown code.
    min_count: int = Field(1, ge=1)
    batch_size: int = Field(65536, ge=64)
    # "in_process": the tables are read whole in the driver (pandas) and encoded on Ray Data.
    # "streaming": read, parse, split and encode block by block on Ray Data, written as Parquet shards
    # (features/train|valid|test); a table may then be a folder of CSV or Parquet shards, a glob or a URI.
    pipeline: Literal["in_process", "streaming"] = "in_process"
    # The strict item cold-start protocol (issue 14): this seeded fraction of the catalog loses every train
    # and valid interaction and is scored only in test (``ctr.auc.new_items``). 0: the standard protocol.
    new_items: float = Field(0.0, ge=0, lt=1)
    new_items_seed: int = 0


class CandidateConfig(_Strict):
    factors: int = Field(64, ge=2)
    iterations: int = Field(15, ge=1)
    regularization: float = Field(0.05, ge=0)
    alpha: float = Field(2.0, gt=0)
    use_gpu: bool | None = None  # None: use implicit's GPU build when it has CUDA
    # How many candidates each user's list holds: what a served request ranks, what `adrec evaluate` scores
    # (candidates.recall@N) and what an ALS tuning trial's recall is taken at. The one candidate-count knob.
    n_candidates: int = Field(100, ge=1)
    # Share of the candidate list each source may fill, in merge order.
    quotas: dict[str, float] = Field(
        default_factory=lambda: {"als": 0.7, "itemitem": 0.15, "popularity": 0.1, "text": 0.05}
    )
    itemitem_k: int = Field(50, ge=1)
    ease_l2: float = Field(200.0, gt=0)  # chosen on the MovieLens-100k validation split
    # Context column whose values split popularity (e.g. ctx.hour); None: the first context column.
    context_field: str | None = None
    seed: int = 0


#: The candidate sources' constructor defaults (ALS, BPR factors, item-item K, EASE l2) are these.
CANDIDATE_DEFAULTS = CandidateConfig()


#: Constructor arguments each top-K source kind accepts (kept here so reading a config imports no
#: model code; tests/unit/test_topk.py checks them against the constructors' signatures).
TOPK_SOURCE_PARAMS: dict[str, frozenset[str]] = {
    "ease": frozenset({"l2", "num_threads"}),
    "als": frozenset({"factors", "iterations", "regularization", "alpha", "seed", "use_gpu", "num_threads"}),
    "bpr": frozenset({"factors", "iterations", "learning_rate", "regularization", "seed", "use_gpu", "num_threads",
                      "verify_negative_samples"}),
    "itemitem": frozenset({"K", "num_threads"}),
    "bm25": frozenset({"K", "K1", "B", "num_threads"}),
    "popularity": frozenset({"weighted", "context_smoothing"}),
}


class TopKSourceConfig(_Strict):
    """One source of the two-stage recommender's candidate union (see adrec.topk.union). The
    recommender takes it flat, as a spec: ``{"kind", "n", "data", **params}``."""

    kind: Literal["ease", "als", "bpr", "itemitem", "bm25", "popularity"]
    n: int = Field(50, ge=1)  # how many of its top items join the union
    data: Literal["positives", "seen"] = "positives"  # what it is fitted on
    # Constructor arguments of the source (e.g. factors, regularization, K, l2); checked when the
    # config is read, so a misspelt one fails here and not after minutes of fitting.
    params: dict[str, float | int | bool | str | None] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_params(self) -> TopKSourceConfig:
        allowed = TOPK_SOURCE_PARAMS[self.kind]
        bad = sorted(set(self.params) - allowed)
        if bad:
            raise ValueError(f"unknown params {bad} for a {self.kind!r} source; known: {sorted(allowed)}")
        return self

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> TopKSourceConfig:
        """Validated, with this class's defaults for what the spec leaves out."""
        fields = ("kind", "n", "data")
        return cls(**{k: spec[k] for k in fields if k in spec}, params={k: v for k, v in spec.items() if k not in fields})

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "n": self.n, "data": self.data, **self.params}


def _default_topk_sources() -> dict[str, TopKSourceConfig]:
    # The settings benchmark_topk chose on the MovieLens-100k validation split for its peers
    # (benchmarks/topk_benchmark.json); one thread each (faster on a shared 2-core machine).
    return {
        "ease": TopKSourceConfig(kind="ease", n=100, params={"l2": 200.0, "num_threads": 1}),
        "als": TopKSourceConfig(kind="als", n=50, params={"factors": 128, "regularization": 10.0, "alpha": 1.0,
                                                          "iterations": 15, "num_threads": 1}),
        "itemitem": TopKSourceConfig(kind="itemitem", n=50, params={"K": 200, "num_threads": 1}),
        "popularity": TopKSourceConfig(kind="popularity", n=30),
    }


class TopKConfig(_Strict):
    """The two-stage top-K recommender (candidate union + learned re-ranker) that orders what
    known users are served and what ``adrec evaluate`` scores. Fitted after the candidate sources by
    ``adrec candidates`` (:func:`adrec.topk.stage.fit_topk`): the re-ranker learns on the valid split
    (and an inner stage carved from train) with sources fitted on train only, then the sources are
    refitted on train + valid. These are also :class:`adrec.topk.TwoStageRecommender`'s defaults."""

    enabled: bool = True  # False: the CTR ranker orders the merged candidates (the older path)
    sources: dict[str, TopKSourceConfig] = Field(default_factory=_default_topk_sources, min_length=1)
    train_stages: list[Literal["valid", "inner"]] = Field(default_factory=lambda: ["valid", "inner"], min_length=1)
    # "auto": LightGBM when it is installed (the `bench` extra), else scikit-learn's
    # HistGradientBoostingClassifier, which needs nothing beyond the base install.
    ranker: Literal["auto", "lightgbm", "sklearn"] = "auto"
    ranker_params: dict[str, float | int | str | bool] = Field(default_factory=dict)
    # The re-ranker's training labels (adrec.topk.recommender.RELEVANCE): "positives" (a target positive = 1),
    # or "graded" (2 = a target positive, 1 = a target item the user interacted with but did not like). Positives:
    # on MovieLens-100k's VALID split graded labels gave NDCG@10 .2165 against .2173 (docs/benchmarks.md, "Toward the
    # top-10 target").
    relevance: Literal["positives", "graded"] = "positives"
    last_n: list[int] = Field(default_factory=lambda: [1, 5, 20], min_length=1)
    windows_days: list[int] = Field(default_factory=lambda: [1, 7, 30])
    transition_span: int = Field(10, ge=1)
    next_candidates: int = Field(0, ge=0)
    rank_depth: int = Field(500, ge=1)
    batch_users: int = Field(512, ge=1)
    seed: int = 0
    # Exposure-aware re-ranking of every served list (adrec.topk.exposure): the weight w of the provider's
    # exposure so far in the list against the scaled relevance; 0 = off (the re-ranker's order).
    exposure_weight: float = Field(0.0, ge=0, le=1)
    exposure_pool: int = Field(100, ge=1)  # the best candidates by re-ranker score it re-ranks
    # The language-model ranker inside the order (issue 14, item 6; adrec.topk.lm): its calibrated click
    # probability and the text similarity of the candidate to the user's last ranker_features_last_n positives
    # as re-ranker features, each stage's from a fusion ranker fitted on that stage's known rows only. On by
    # default: chosen on VALID (MovieLens-100k, docs/benchmarks.md "The language-model ranker inside the order").
    ranker_features: bool = True
    # Overrides of the stage rankers' configuration: the ranker section, then adrec.topk.lm.STAGE_RANKER_DEFAULTS
    # (fewer epochs, no refit), then these (any RankerConfig key).
    ranker_features_params: dict[str, Any] = Field(default_factory=dict)
    ranker_features_last_n: int = Field(10, ge=1)

    def recommender_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`adrec.topk.TwoStageRecommender` (whose defaults they are)."""
        return {
            "sources": {name: s.spec() for name, s in self.sources.items()},
            "train_stages": list(self.train_stages), "last_n": list(self.last_n),
            "windows_days": list(self.windows_days), "transition_span": self.transition_span,
            "next_candidates": self.next_candidates, "rank_depth": self.rank_depth, "ranker": self.ranker,
            "ranker_params": dict(self.ranker_params), "relevance": self.relevance,
            "batch_users": self.batch_users, "seed": self.seed,
            "exposure_weight": self.exposure_weight, "exposure_pool": self.exposure_pool,
            "ranker_features": self.ranker_features, "ranker_features_params": dict(self.ranker_features_params),
            "ranker_features_last_n": self.ranker_features_last_n,
        }


class DPConfig(_Strict):
    """DP-SGD for the ranker (adrec.ranking.train.privacy): per-example clipping to ``max_grad_norm``,
    Gaussian noise calibrated by Opacus' accountant so that the whole planned training spends at most
    ``target_epsilon`` at ``delta``, batches drawn by Poisson sampling (each row with probability
    batch_size / rows)."""

    target_epsilon: float = Field(gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    # Rows whose per-example gradients are computed at once (memory, not privacy: a logical batch is
    # still one noisy step).
    physical_batch: int = Field(32, ge=1)
    accountant: Literal["rdp", "prv"] = "rdp"


class LoraSettings(_Strict):
    """LoRA of the encoder (``ranker.finetune=lora``, Hugging Face peft): low-rank updates of the target
    projections, trained with their own learning rate and merged into the encoder when the ranker is saved."""

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    # Module names peft matches (BERT/MiniLM self-attention: query, key, value; the FFN: intermediate.dense ...).
    target_modules: list[str] = Field(default_factory=lambda: ["query", "value"], min_length=1)
    # Low-rank factors start at zero (B) and want a larger step than full fine-tuning's encoder_lr.
    lr: float = Field(5e-4, gt=0)


class RankerConfig(_Strict):
    encoder: str = "sentence-transformers/all-MiniLM-L6-v2"
    # A tiny randomly initialised BERT with the encoder's tokenizer: for tests and smoke runs.
    tiny_encoder: bool = False
    # frozen: the CPU-friendly default (on MovieLens-100k as good on valid as last_n, at a fraction of the
    # cost; docs/benchmarks.md, "Ranker variants"); last_n / full fine-tune the encoder with its own lr (encoder_lr), for GPUs.
    # lora: low-rank adapters on the attention projections (ranker.lora), merged for serving (issue 14).
    finetune: Literal["frozen", "last_n", "full", "lora"] = "frozen"
    finetune_last_n: int = Field(1, ge=1)
    lora: LoraSettings = LoraSettings()
    # False: no item text tower (the ablation's "no text" row): the encoder never runs, item text adds nothing.
    text_tower: bool = True
    # Candidate sources whose (user, item) scores join the cross tower, fitted leakage-free on earlier rows
    # (adrec.ranking.collab): any of "ease", "als", "itemitem". Empty: none (issue 14, opt-in).
    collab: list[Literal["ease", "als", "itemitem"]] = Field(default_factory=list)
    max_text_len: int = Field(32, ge=8)
    embed_dim: int = Field(32, ge=4)
    hidden: list[int] = Field(default_factory=lambda: [256, 128])
    cross_layers: int = Field(2, ge=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    lr: float = Field(2e-3, gt=0)
    encoder_lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    batch_size: int = Field(512, ge=1)
    grad_accum: int = Field(1, ge=1)
    epochs: int = Field(12, ge=1)  # at most; early stopping on the valid AUC picks the count
    early_stopping_patience: int = Field(2, ge=1)
    max_steps_per_epoch: int | None = None
    fgsm_epsilon: float = Field(0.0, ge=0)  # > 0 turns on FGSM adversarial training
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    bf16: bool = True  # autocast on GPU only
    torch_threads: int = Field(1, ge=1)
    seed: int = 0
    # ---- added with the fusion ranker (adrec.ranking) ----
    # Unique candidate items per step whose text runs through the trainable encoder layers with
    # gradients (a random sample; 0 = all of them). The rest read the per-epoch text cache.
    text_items_per_step: int = Field(16, ge=0)
    cross_rank: int = Field(64, ge=1)  # rank of the DCN-v2 cross layers
    att_hidden: int = Field(64, ge=1)  # hidden units of the target-attention MLP
    embed_dropout: float = Field(0.0, ge=0, lt=1)
    # Exponential moving average of the weights (selected, checkpointed and saved); None = off.
    ema_decay: float | None = Field(0.99, gt=0, lt=1)
    # Members of the deep ensemble (independently initialised heads over one shared text tower; logits averaged).
    ensemble: int = Field(1, ge=1)
    ensemble_bagging: bool = False  # online bagging: Poisson(1) row weights per member
    ensemble_mixed: bool = False  # members alternate the FM term and the use of the history
    fm: bool = False  # add FM pairwise dot products of the field embeddings (and candidate . interest) to the logit
    # Recency weighting of training rows: a row's weight halves every this fraction of its user's
    # timeline (0 = the user's latest row, 1 = the earliest); None = uniform weights.
    recency_half_life: float | None = Field(None, gt=0)
    calibrate: bool = True  # Platt scaling on the validation split after training
    # After selecting the epoch count on valid, retrain from the same initial weights on train + valid.
    refit: bool = True
    max_failures: int = Field(1, ge=0)  # Ray Train FailureConfig: worker-group restarts from the last checkpoint
    # Ray Train storage (checkpoints): a path or URI; None: <run>/ranker_train (on the run's store).
    # Must be shared by all nodes on a cluster (a local path there is refused before training starts).
    storage_path: str | None = None
    # How Ray Train places the workers: PACK (fewest nodes), SPREAD (across nodes where it can),
    # STRICT_SPREAD (one worker per node: each worker's share of the data on its own machine).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    # Re-running with the same configuration resumes from its latest checkpoint; False starts over.
    resume: bool = True
    # DP-SGD (adrec.ranking.train.privacy): None = off. finetune frozen (the encoder gets no noise) or lora (the
    # adapter is clipped and noised with the rest).
    dp: DPConfig | None = None
    # Where the training rows come from (issue 13). in_memory: the rows as arrays, put once in Ray's object
    # store and read whole by every worker. streaming: Ray Data reads the run's Parquet shards
    # (features.pipeline: streaming) and each worker iterates its own split of them (a streaming split, no
    # copy of the table anywhere; validation streamed the same way). auto: streaming when the run's features
    # are shards, else in_memory. Streaming does not take collab, recency_half_life or dp (they need the
    # whole table in one place).
    data_feed: Literal["auto", "in_memory", "streaming"] = "auto"
    # Rows of the bounded buffer the streamed feed shuffles each epoch's train rows through
    # (Ray Data's local_shuffle_buffer_size): more mixes more and holds more in each worker.
    shuffle_buffer: int = Field(50_000, ge=1)
    # CPUs Ray reserves for each training worker (Ray Train's default: 1). The streamed feed's read tasks need
    # CPUs too: with num_workers x cpus_per_worker equal to the cluster's CPUs they never run and training
    # waits forever (seen with 2 workers on 2 CPUs); a fraction (e.g. 0.5) leaves them room.
    cpus_per_worker: float | None = Field(None, gt=0)
    # What the ranker predicts (issue 17): [ctr] clicks only; [ctr, cvr] adds the ESMM head (Ma et al., SIGIR
    # 2018): a CVR tower beside the click one on the shared representation, pCTCVR = pCTR x pCVR, trained on
    # every impression with BCE(pCTR, click) + BCE(pCTCVR, click and conversion). Needs a conversion label
    # in the data (the schema's interactions.conversion). Default [ctr]: docs/benchmarks.md, "Conversions".
    tasks: list[Literal["ctr", "cvr"]] = Field(default_factory=lambda: ["ctr"], min_length=1)
    # The weight of the CTCVR term in that loss (ESMM's own: 1). Above 1 the CVR tower, whose positives are the
    # few conversions, learns faster relative to the click tower (which may stop improving epochs earlier).
    cvr_loss_weight: float = Field(1.0, gt=0)
    # An auxiliary CVR loss on the clicked rows, added to ESMM's two (adrec.ranking.fgsm.esmm_loss): "none"
    # (ESMM's own loss), "clicked" (the mean BCE(pCVR, conversion) over the clicked rows: ESMM + aux) or "ipw"
    # (ESCM²'s inverse-propensity form: BCE(pCVR, conversion) / pCTR summed over the clicked rows, over all rows).
    # It gives the CVR tower, whose positives are few, a direct gradient (docs/benchmarks.md, "Conversions").
    cvr_aux_loss: Literal["none", "clicked", "ipw"] = "none"
    cvr_aux_weight: float = Field(1.0, gt=0)
    # True: pCTR enters the CTCVR term as a constant (stop-gradient), so that term trains the CVR tower only and
    # the click tower learns from the click loss alone (ESMM's product also pulls pCTR down on unconverted clicks).
    ctcvr_detach_ctr: bool = False
    # A two-task ranker's own stopping epoch for its CVR tower: after the joint epochs are selected (on the mean of
    # the valid CTR and CTCVR AUCs), up to this many epochs more train the CVR tower alone (its MLP, output and
    # wide weights; the shared representation and the click tower stay as selected, so pCTR does not move), each
    # kept while that valid score improves (early_stopping_patience). The CVR tower learns from far fewer
    # positives and is often still improving when the click tower starts to overfit. 0: one stopping epoch for
    # both. Skipped under ranker.dp (its accountant plans the noisy steps before training).
    cvr_tower_epochs: int = Field(0, ge=0)

    @field_validator("tasks")
    @classmethod
    def _ctr_first(cls, v: list[str]) -> list[str]:
        if v not in (["ctr"], ["ctr", "cvr"]):
            raise ValueError(f"ranker.tasks must be [ctr] or [ctr, cvr] (pCVR is learned through pCTR), not {v}")
        return v

    @model_validator(mode="after")
    def _dp_needs_what_it_covers(self) -> "RankerConfig":
        if self.dp is None:
            return self
        if self.finetune not in ("frozen", "lora"):
            raise ValueError(f"ranker.dp takes finetune: frozen or lora, not {self.finetune}: the last_n and full "
                             "encoder updates are computed over the batch's shared unique items, which DP-SGD's "
                             "per-example clipping cannot split by row (a LoRA adapter is trained privately: each "
                             "row encodes its own candidate's text)")
        if self.fgsm_epsilon > 0:
            raise ValueError("ranker.dp needs fgsm_epsilon: 0: FGSM perturbs the inputs along the gradient of the "
                             "whole batch's loss, so one row's training loss would depend on the other rows and "
                             "clipping it would no longer bound that row's influence")
        if self.ensemble_bagging:
            raise ValueError("ranker.dp needs ensemble_bagging: false: bagging draws Poisson(1) copies of each row "
                             "per member, a sampling of its own that the accountant (Poisson sampling of rows, one "
                             "weight per row) does not count")
        return self


class EvalConfig(_Strict):
    k: int = Field(10, ge=1)
    # (The candidates evaluated per user are candidates.n_candidates: what a served request ranks.)
    fgsm_epsilons: list[float] = Field(default_factory=lambda: [0.0, 0.01, 0.05, 0.1])
    # topk.exposure_weight values of the report's trade-off curve (NDCG@K vs provider Gini); [] = none.
    exposure_weights: list[float] = Field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.5, 0.8])
    # Users whose served lists the report's explanation-faithfulness check attributes (Integrated Gradients); 0 = off.
    explain_users: int = Field(50, ge=0)


#: What orders a served list (``serve.objective``; see adrec.serving.strategy).
OBJECTIVES = ("relevance", "expected_clicks", "expected_value")


class ExplorationConfig(_Strict):
    """How Serve explores (adrec.serving.strategy): every served list carries each item's position and
    propensity (the probability that the policy put it there, given the items above), which /feedback
    impressions log for off-policy evaluation."""

    # off: the objective's order (propensity 1, policy "greedy"); epsilon_greedy: at each position the
    # best remaining item with probability 1 - epsilon, else one of the remaining pool items uniformly;
    # thompson: at each position the best remaining item by a click probability sampled from a Beta
    # posterior per item, Beta(strength * pCTR, strength * (1 - pCTR)).
    policy: Literal["off", "epsilon_greedy", "thompson"] = "off"
    epsilon: float = Field(0.1, ge=0, le=1)
    # Thompson: the posterior's pseudo-impressions (its concentration); smaller explores more.
    thompson_strength: float = Field(20.0, gt=0)
    # Thompson: the Monte-Carlo draws per request that estimate each position's propensity (the served
    # draw is one of them, so a served item's estimate is never 0).
    thompson_draws: int = Field(200, ge=1)


class ABArm(_Strict):
    """One arm of an A/B test: a model version and its share of the users."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    # A version folder or URI, or a run (its live version), as serve's model_dir; None: the app's own
    # model_dir, the version rollouts move.
    model_dir: str | None = None
    share: float = Field(gt=0, le=1)


class ABConfig(_Strict):
    """Serve splits users between versions by a stable hash of the pseudonymized user id."""

    arms: list[ABArm] = Field(min_length=2)
    # Mixed into the hash: a new salt re-draws which users land in which arm (a new experiment).
    salt: str = Field("adrec-ab", min_length=1)

    @model_validator(mode="after")
    def _check_arms(self) -> ABConfig:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"serve.ab.arms: arm names must be unique, got {names}")
        total = sum(a.share for a in self.arms)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"serve.ab.arms: the shares must sum to 1, they sum to {total:g}")
        return self


class ServeConfig(_Strict):
    # "fused": the whole model in the Ingress replicas (the fewest hops; the default on a few cores);
    # "graph": Ingress -> CandidateDeployment -> RankerDeployment, each stage scaled on its own.
    topology: Literal["graph", "fused"] = "fused"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    max_k: int = Field(100, ge=1)
    # The API key every endpoint but /healthz wants (x-api-key header): api_key, else api_key_file, else
    # $ADREC_API_KEY, else the run's secrets/api.key. A literal key is moved into that file (mode 0600)
    # when the config is saved (the saved config holds its fingerprint, as for data.pseudonym_key). An
    # empty key is an error, never "auth off".
    api_key: str | None = None
    api_key_file: str | None = None
    # Without an API key, Serve listens on loopback only: a host beyond it (0.0.0.0, a LAN address) refuses
    # to start unless this is set explicitly (then it starts with a warning).
    allow_unauthenticated: bool = False
    max_body_bytes: int = Field(65536, ge=1024)
    feedback_log: str | None = None  # default: <run>/feedback/events.jsonl
    # A /feedback event's ts must lie within this window around the server's clock (else 422): at most
    # this far ahead (clock skew of clients), and at most this far behind (None: unbounded, e.g. to
    # backfill or replay old logs). Nanoseconds, far future and negative ts are refused by default.
    feedback_max_ahead_s: float = Field(300.0, ge=0)
    feedback_max_behind_s: float | None = Field(7 * 86400.0, ge=0)
    # The feedback writer's index of event ids (the idempotency key) keeps at most this many ids, none
    # older than the window (by the time they were received): an event re-sent later is logged again.
    feedback_dedup_max_ids: int = Field(1_000_000, ge=1)
    feedback_dedup_window_s: float | None = Field(7 * 86400.0, gt=0)
    ranker_replicas: int = Field(1, ge=1)
    candidate_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(64, ge=1)
    num_cpus_per_replica: float = Field(0.25, gt=0)
    # Ingress replicas (stateless).
    ingress_replicas: int = Field(1, ge=1)
    # Writer replicas of /feedback: one for a file log (one writer per file); a segment log on a shared
    # store (feedback_log=s3://...) takes several, on any nodes, each writing its own segments.
    feedback_replicas: int = Field(1, ge=1)
    # Who writes /feedback's events in the fused topology: `ingress` (each Ingress replica is a writer of its
    # own segments; no handle call per request, which cost ~2/3 of a /feedback request's CPU), `deployment`
    # (the FeedbackDeployment's replicas), `auto`: ingress when the log is a segment log on a shared store
    # (several writers allowed), else deployment (a file log has one writer). Default deployment: the
    # Ingress writer has not yet run in the two-node walkthrough, the only test whose replicas reach a store.
    feedback_writer: Literal["auto", "ingress", "deployment"] = "deployment"
    # > ranker_replicas turns on autoscaling of the ranker between the two.
    ranker_max_replicas: int | None = Field(None, ge=1)
    # At most this many replicas of one deployment on one node (Serve's max_replicas_per_node): 1 spreads
    # them over the cluster's nodes, so losing a node leaves replicas on the others. None: Serve decides.
    max_replicas_per_node: int | None = Field(None, ge=1)
    # Where Serve runs an HTTP ingress on a cluster: every node (Ray's default: a load balancer in front
    # reaches any node) or the head only (one address; what nodes sharing one network address need).
    proxy_location: Literal["EveryNode", "HeadOnly"] = "EveryNode"
    # (How many candidates a request ranks is candidates.n_candidates: one knob for both stages.)
    # Versions with at most this many known users get every user's two-stage list computed when they
    # load (seconds, a few bytes per item), so a request only looks it up; 0 = compute per request.
    precompute_max_users: int = Field(200_000, ge=0)
    # @serve.batch of the ranker: requests per batch and how long a batch may wait to fill.
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.002, ge=0)
    # How long the ingress waits on the graph before answering 503.
    request_timeout_s: float = Field(10.0, gt=0)
    # Serve's per-request access log lines (path, status, latency; never bodies): off for throughput.
    access_log: bool = False
    # explain=true (adrec.serving.explanations): the first this many items get the ranker's explanations, and
    # Integrated Gradients runs while this budget lasts (then the answer degrades to sources + history).
    explain_max_items: int = Field(10, ge=0)
    explain_budget_ms: float = Field(500.0, ge=0)
    # What orders a list (adrec.serving.strategy): "relevance" (the two-stage re-ranker for known users, the
    # click probability for others: the order before objectives existed), "expected_clicks" (pCTR) or
    # "expected_value" (bid x pCTR; bid x pCTCVR with the ESMM head, ranker.tasks=[ctr,cvr]). The bid is the items
    # table's `bid:` column of the schema YAML. Reported in every /recommend answer.
    objective: Literal["relevance", "expected_clicks", "expected_value"] = "relevance"
    # How many of a list's best candidates (in relevance order) an objective other than relevance, or an
    # exploration policy, chooses from; each costs a ranker row per request.
    pool: int = Field(50, ge=1)
    exploration: ExplorationConfig = ExplorationConfig()
    # A/B between model versions (None: every user gets the app's version).
    ab: ABConfig | None = None

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, v: str | None, info) -> str | None:
        check_not_empty(v, f"serve.{info.field_name}")
        return v

    @field_validator("api_key_file")
    @classmethod
    def _file_not_empty(cls, v: str | None, info) -> str | None:
        check_not_empty(v, f"serve.{info.field_name}")
        return v


class RayConfig(_Strict):
    address: str | None = None  # None: start a local Ray in-process
    num_cpus: int | None = None
    include_dashboard: bool = False
    # How HTTP reaches Serve's ingress replicas on a Ray that adrec starts (see adrec.runtime):
    # "haproxy": Ray's HAProxy ingress (C) forwards to the replicas' own HTTP servers (Serve's
    # high-throughput mode); "proxy": Serve's Python proxy actor, Ray's default. A cluster started
    # elsewhere keeps the mode it was started with (cluster.yaml starts it in "haproxy").
    serve_ingress: Literal["haproxy", "proxy"] = "haproxy"


class OnlineConfig(_Strict):
    """The online learner (``adrec.online``): feedback -> attributed examples -> updates -> versions.

    Times are event time (the ``ts`` of the feedback events), so a replay after a crash labels and
    orders every example exactly as the first pass did.
    """

    # A click labels the most recent earlier impression of the same (user, item) at most this long before it.
    attribution_window_s: float = Field(1800.0, gt=0)
    # An impression is labelled (and learned from) once the event-time watermark (the largest ts seen)
    # passes its ts + window + this slack; clicks that come later still are counted as late, not learned.
    lateness_s: float = Field(0.0, ge=0)
    # The watermark never moves past the learner's clock plus this skew, whatever the events' ts say
    # (counted as future_ts_clamped): the same bound as serve.feedback_max_ahead_s, for logs written
    # before the ingress checked ts or by other writers. None: no bound (replays of logs from elsewhere).
    max_ahead_s: float | None = Field(300.0, ge=0)
    # Per-coordinate FTRL-Proximal around the served weights, AdaGrad, or plain mini-batch SGD.
    optimizer: Literal["ftrl", "adagrad", "sgd"] = "ftrl"
    lr: float = Field(0.1, gt=0)  # sgd / adagrad step size; ftrl's alpha
    ftrl_beta: float = Field(1.0, ge=0)
    ftrl_l1: float = Field(0.0, ge=0)
    ftrl_l2: float = Field(0.0, ge=0)
    batch_size: int = Field(64, ge=1)
    # Parameter groups the learner updates: "head" (cross layers, MLP, output), "fusion" (text projection,
    # target attention, history positions) and "embeddings" (id/field embeddings and the wide weights).
    # The encoder is never updated online (the served item text cache stays valid).
    train_layers: list[Literal["head", "fusion", "embeddings"]] = Field(
        default_factory=lambda: ["head", "fusion", "embeddings"], min_length=1)
    # Publication: a decision every N learned impressions and/or every T seconds (None disables either).
    # Count-based decisions replay exactly after a restart; time-based ones depend on the wall clock.
    publish_every_events: int | None = Field(5000, ge=1)
    publish_every_s: float | None = Field(None, gt=0)
    # A rollout starts at least this long after the previous one ended; versions published meanwhile are
    # coalesced (the newest is rolled out). Every rollout costs the requests it overlaps (each replica
    # loads the version beside the live one: measured p99 1.6x at concurrency 8 on 2 cores under
    # back-to-back rollouts), so this bounds the share of traffic that pays it. 0: roll out at once.
    rollout_min_interval_s: float = Field(30.0, ge=0)
    # Guard: refuse a version whose progressive logloss since the last decision exceeds the serving
    # version's on the same events by more than this fraction (0.01 = 1%).
    guard_margin: float = Field(0.01, ge=0)
    guard_min_events: int = Field(200, ge=1)  # fewer scored events since the last decision: no publication yet
    on_refuse: Literal["continue", "revert"] = "continue"  # keep learning, or restart from the serving weights
    # Offset, model, optimizer, joiner, catalog and metrics are checkpointed together (one atomic file)
    # at most this many log records apart, and at every publication decision.
    checkpoint_every_events: int = Field(2000, ge=1)
    read_batch_events: int = Field(2000, ge=1)  # log records read per step
    poll_interval_s: float = Field(0.25, gt=0)
    keep_versions: int = Field(4, ge=2)  # published version folders kept (the live one and its predecessors)
    # A published version holds at most this many users more than its predecessor (users first seen in
    # feedback); events of further new users are learned from as cold users but not added (counted as
    # refused_new_users). None: unbounded.
    max_new_users_per_version: int | None = Field(10_000, ge=0)
    # A learner whose step fails is rebuilt from its checkpoint this many times in a row (backoff doubling
    # from restart_backoff_s) before it reports itself unhealthy and stops.
    max_restarts: int = Field(5, ge=0)
    restart_backoff_s: float = Field(1.0, ge=0)
    # On publication: re-solve the ALS factors of the users (new ones included) and items with online clicks
    # against the fixed other side, and add the clicks to the history-based candidate sources.
    fold_in: bool = True
    track_frozen: bool = True  # also score every event with the initial model (frozen baseline)
    # Event-time boundaries that split the progressive metrics into segments (e.g. the drift time).
    segments_ts: list[float] = Field(default_factory=list)
    recent_window: int = Field(5000, ge=10)  # events in the "recent" progressive metrics
    # The learning thread gives way to serving: SCHED_IDLE (Linux: it only gets CPU time nothing else
    # wants) when sched_idle is set, else this nice increment.
    sched_idle: bool = True
    nice: int = Field(10, ge=0, le=19)
    num_cpus: float = Field(0.25, gt=0)  # Ray resources of the learner actor
    torch_threads: int = Field(1, ge=1)
    # Throttle: the learner works at most this share of wall time (1.0 = as fast as it can).
    max_busy_fraction: float = Field(1.0, gt=0, le=1)
    state_dir: str | None = None  # default: <run>/online


class AdrecConfig(_Strict):
    data: DataConfig = DataConfig()
    features: FeatureConfig = FeatureConfig()
    candidates: CandidateConfig = CandidateConfig()
    topk: TopKConfig = TopKConfig()
    ranker: RankerConfig = RankerConfig()
    eval: EvalConfig = EvalConfig()
    serve: ServeConfig = ServeConfig()
    ray: RayConfig = RayConfig()
    online: OnlineConfig = OnlineConfig()

    def to_dict(self) -> dict[str, Any]:
        """The config as adrec writes it anywhere (config.yaml, manifests, Tune's files): every literal
        secret replaced by its fingerprint (see :data:`SECRET_FIELDS`)."""
        d = json.loads(self.model_dump_json())
        for (section, key), _ in SECRET_FIELDS.items():
            value = d[section][key]
            if value is not None and not is_fingerprint(value):
                d[section][key] = key_fingerprint(value)
        return d

    def literal_secrets(self) -> dict[str, str]:
        """The secrets given literally (not as a fingerprint): secrets-file name -> key."""
        out = {}
        for (section, key), filename in SECRET_FIELDS.items():
            value = getattr(getattr(self, section), key)
            if value is not None and not is_fingerprint(value):
                out[filename] = value
        return out


#: Config fields that hold a secret -> the file of a run's secrets folder that keeps it.
SECRET_FIELDS: dict[tuple[str, str], str] = {("data", "pseudonym_key"): PSEUDONYM_KEY_FILE,
                                             ("serve", "api_key"): API_KEY_FILE}


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{where}' (check the spelling; see adrec/config.py for the keys)")
        else:
            lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``ranker.lr=1e-3`` -> ``{"ranker": {"lr": 0.001}}`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value, e.g. ranker.epochs=2")
    dotted, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    if raw.strip() == "" and tuple(dotted.strip().split(".")) in SECRET_FIELDS:
        # `--set serve.api_key=$KEY` with an empty $KEY: an empty key (an error), never "no key" (auth off).
        value = raw
    node: dict[str, Any] = {}
    cur = node
    parts = dotted.strip().split(".")
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value
    return node


def build_config(base: dict[str, Any] | None = None, overrides: list[str] | None = None, source: str = "config") -> AdrecConfig:
    data = dict(base or {})
    for o in overrides or []:
        data = deep_merge(data, parse_override(o))
    try:
        return AdrecConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> AdrecConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply ``a.b=value`` overrides."""
    base: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            base = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p} is not valid YAML: {err}") from None
        if not isinstance(base, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        source = str(p)
    return build_config(base, overrides, source)


def save_config(cfg: AdrecConfig, path: str | Path) -> None:
    """Write ``cfg`` to ``path`` (a run's config.yaml) with fingerprints in place of secrets; a secret
    given literally is kept in the ``secrets/`` folder beside it (mode 0600), where the later stages and
    Serve find it."""
    path = Path(path)
    for filename, value in cfg.literal_secrets().items():
        store_secret(path.parent / SECRETS_DIR / filename, value)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

