"""Response models of the Serve API: what each endpoint answers, every field documented (OpenAPI docs).

The ingress answers plain dicts of these shapes (a ``JSONResponse``: the models document the answer,
they are not re-validated per request, a measurable share of a request's CPU when they were).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class FeatureAttribution(BaseModel):
    feature: str = Field(description="An input group of the ranker: a feature field (e.g. item.genre, ctx.slot, "
                                     "user.age, a cross x:a*b, the id fields user and item), a pooled multi-valued "
                                     "field, or a part of the item's representation: item.id, item.attributes, "
                                     "item.text, or history (the embeddings of the user's recent positives).")
    kind: Literal["user", "item", "context", "cross", "text", "history", "other"] = Field(
        description="What the group is, for a reader.")
    attribution: float = Field(description="Integrated Gradients of the ranker's logit over the group's input "
                                           "embeddings, from an all-zero baseline (the group removed): how much "
                                           "the group moves the item's logit. The groups sum to logit(input) - "
                                           "logit(baseline), up to the integral's error.")
    sign: Literal["+", "-"] = Field(description="'+' when the group raises the item's score, '-' when it lowers it.")
    share: float = Field(ge=0, le=1, description="|attribution| over the sum of |attribution| of every group of "
                                                 "the item (all groups, not only the ones listed).")
    value: str | None = Field(None, description="The feature's readable value, for item and context "
                                                "vocabularies only (never user data); absent otherwise.")


class LikedItem(BaseModel):
    item: str = Field(description="An item of the user's history (their earlier positives), by its id.")
    weight: float = Field(description="method 'attention': the ranker's target-attention weight of this history "
                                      "item for the recommended one (the weights of a list sum to at most 1); "
                                      "method 'als': its signed share of the ALS score, its contribution "
                                      "(implicit's explain()) over the sum of the absolute contributions of "
                                      "all the user's liked items (the absolute shares sum to at most 1).")
    contribution: float | None = Field(None, description="method 'als' only: the raw contribution to the ALS "
                                                         "score (a dot product of factors; null for 'attention').")
    method: Literal["attention", "als"] = Field(description="Where the weight comes from (see weight).")


class RecommendedItem(BaseModel):
    item: str = Field(description="The ad's id, as in the data set.")
    rank: int = Field(ge=1, description="1 for the first item of the list.")
    click_prob: float = Field(ge=0, le=1, description="The CTR ranker's probability that the user clicks the "
                                                      "item in this context. Always present.")
    relevance: float | None = Field(description="The two-stage re-ranker's score (unbounded, higher ranks first; "
                                                "not a probability) when it ordered the list (ranked_by "
                                                "'two_stage'); null when the click probability did.")
    position: int = Field(ge=0, description="The item's 0-based position in the list (rank - 1): what a /feedback "
                                            "impression of it reports as position.")
    propensity: float = Field(gt=0, le=1, description="The probability that the serving policy put this item at "
                                                      "this position, given the items above it: 1 without "
                                                      "exploration; exact for epsilon_greedy; a Monte-Carlo "
                                                      "estimate (serve.exploration.thompson_draws) for thompson. "
                                                      "A /feedback impression of the item reports it.")
    bid: float | None = Field(None, description="The item's bid (the schema's items.bid column), null when the "
                                                "model version has no bids.")
    sources: list[str] | None = Field(None, description="With explain: the candidate sources that proposed the "
                                                        "item (e.g. ease, als, popularity; 'catalog' when it "
                                                        "filled a short candidate union).")
    because_you_liked: list[LikedItem] | None = Field(
        None, description="With explain: the user's history items that contributed most, by the ranker's "
                          "attention (top 3) and, for an item the ALS source proposed, by ALS (top 3).")
    features: list[FeatureAttribution] | None = Field(
        None, description="With explain: the ranker's top 5 input groups by |attribution| (Integrated "
                          "Gradients). null when the request's explanation budget (serve.explain_budget_ms) "
                          "ran out before this item, beyond serve.explain_max_items, or for a ranker "
                          "without input embeddings.")


class RecommendResponse(BaseModel):
    user_id: str = Field(description="The user id of the request, as sent.")
    version: str = Field(description="The model version that answered.")
    ranked_by: Literal["two_stage", "click_prob", "expected_value"] = Field(
        description="What ordered the list: 'two_stage' (the two-stage re-ranker, for users the model knows; "
                    "each item's relevance is its score), 'click_prob' (the CTR ranker's click probability: "
                    "for users it does not know, or every user under the expected_clicks objective) or "
                    "'expected_value' (bid x click probability: the expected_value objective). With "
                    "exploration on, the policy departs from that order at some positions (see propensity).")
    objective: Literal["relevance", "expected_clicks", "expected_value"] = Field(
        description="The app's ordering objective (serve.objective).")
    policy: Literal["greedy", "epsilon_greedy", "thompson"] = Field(
        description="The policy that filled the list: 'greedy' (exploration off: the objective's order) or the "
                    "exploration policy (serve.exploration.policy). /feedback impressions report it.")
    request_id: str = Field(description="The list's id (its random draws are seeded by it). /feedback "
                                        "impressions report it.")
    arm: str | None = Field(description="The A/B arm the user is in (serve.ab), whose model version answered; "
                                        "null without A/B. The server logs it with the user's impressions.")
    items: list[RecommendedItem] = Field(description="At most k items, best first.")
    explain_complete: bool | None = Field(
        None, description="With explain: true when every item got its feature attributions; false when the "
                          "time budget or serve.explain_max_items cut them short (sources and "
                          "because_you_liked are always there).")


class FeedbackResponse(BaseModel):
    accepted: int = Field(ge=0, description="Events written to the feedback log (durably: fsync-ed before this "
                                            "answer).")
    duplicates: int = Field(ge=0, description="Events whose event_id was already logged (or repeated in the "
                                              "request): accepted, not written again.")
    duplicate_ids: list[str] = Field(description="The event ids counted in duplicates.")


class HealthResponse(BaseModel):
    status: Literal["ok", "unavailable"] = Field(description="'ok' (200) once a model version is loaded, "
                                                          "'unavailable' (503) before or when a part is down. "
                                                          "Nothing else: GET /version tells which version.")


class VersionResponse(BaseModel):
    version: str = Field(description="The model version's id.")
    created: str | None = Field(None, description="When the version was written (ISO 8601).")
    run: str | None = Field(None, description="The run folder the version was published from.")
    n_users: int | None = Field(None, description="Users the version knows.")
    n_items: int | None = Field(None, description="Items in its catalogue.")


class ErrorResponse(BaseModel):
    detail: str = Field(description="What went wrong (never echoes submitted values).")
    errors: list[str] | None = Field(None, description="One line per invalid field, for 422 answers.")


def version_info(rec) -> dict:
    """The :class:`VersionResponse` of a :class:`~adrec.serving.recommender.Recommender`'s version."""
    info = rec.version.info
    return {k: info[k] for k in VersionResponse.model_fields if k in info}
