"""Response models of the Serve API: what each endpoint answers, every field documented (OpenAPI docs).

The ingress answers plain dicts of these shapes (a ``JSONResponse``: the models document the answer,
they are not re-validated per request, a measurable share of a request's CPU when they were).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class FeatureContribution(BaseModel):
    feature: str = Field(description="A feature field of the ranker's input (e.g. item.genre, ctx.slot) or "
                                     "'history' (the user's recent positives).")
    contribution: float = Field(description="How much the item's click probability drops when this feature is "
                                            "replaced by 'unknown' (occlusion): larger raises the item more.")
    value: str | None = Field(None, description="The feature's readable value, for item and context "
                                                "vocabularies only (never user data); absent otherwise.")


class RecommendedItem(BaseModel):
    item: str = Field(description="The ad's id, as in the data set.")
    rank: int = Field(ge=1, description="1 for the first item of the list.")
    click_prob: float = Field(ge=0, le=1, description="The CTR ranker's probability that the user clicks the "
                                                      "item in this context. Always present.")
    relevance: float | None = Field(description="The two-stage re-ranker's score (unbounded, higher ranks first; "
                                                "not a probability) when it ordered the list (ranked_by "
                                                "'two_stage'); null when the click probability did.")
    sources: list[str] | None = Field(None, description="With explain: the candidate sources that proposed the "
                                                        "item (e.g. ease, als, popularity).")
    features: list[FeatureContribution] | None = Field(None, description="With explain: the features that raise "
                                                                         "the item's click probability most.")


class RecommendResponse(BaseModel):
    user_id: str = Field(description="The user id of the request, as sent.")
    version: str = Field(description="The model version that answered.")
    ranked_by: Literal["two_stage", "click_prob"] = Field(
        description="What ordered the list: 'two_stage' (the two-stage re-ranker, for users the model knows; "
                    "each item's relevance is its score) or 'click_prob' (the CTR ranker's click probability, "
                    "for users it does not know).")
    items: list[RecommendedItem] = Field(description="At most k items, best first.")


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
