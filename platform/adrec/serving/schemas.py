"""Request models of the Serve API and the strict body parsing in front of them.

Everything a client sends is parsed here, before any deployment sees it:

- the body is read with a byte cap (``413`` beyond it), decoded as strict UTF-8 (``400``), parsed as
  JSON without ``NaN``/``Infinity`` (``400``), then validated by a strict pydantic model (``422``):
  no type coercion (``"5"`` is not an int, ``1`` is not a bool), no unknown fields, bounded sizes;
- error messages name the offending field and the rule, never echo the submitted value (raw user ids
  must not reach logs, and error messages do get logged).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StringConstraints, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from adrec.errors import ApiError

MAX_CONTEXT_KEYS = 32
MAX_EVENTS = 1000
#: The optional serving fields of a /feedback impression, logged as top-level keys (with the server's ``arm``).
SERVED_FIELDS = ("position", "propensity", "policy", "request_id")

Id = Annotated[str, StringConstraints(min_length=1, max_length=256)]
ContextKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
ContextValue = Annotated[str, StringConstraints(max_length=256)] | int
Context = Annotated[dict[ContextKey, ContextValue], Field(max_length=MAX_CONTEXT_KEYS)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class RecommendRequest(_Strict):
    user_id: Id = Field(description="The user's id as in the data set (pseudonymized at the ingress, never logged).")
    k: int = Field(ge=1, description="How many items to answer (at most the app's max_k).")
    context: Context = Field(default_factory=dict, description="The request's context fields (e.g. slot, device), "
                                                               "strings or integers.")
    explain: bool = Field(False, description="Explain each item: the candidate sources that proposed it, the "
                                             "history items that contributed most ('because you liked') and "
                                             "the ranker's top feature attributions (Integrated Gradients), "
                                             "within the app's time budget (see RecommendedItem).")

    @field_validator("k")
    @classmethod
    def _k_bound(cls, k: int, info: ValidationInfo) -> int:
        max_k = (info.context or {}).get("max_k")
        if max_k is not None and k > max_k:
            raise ValueError(f"k must be at most {max_k}")
        return k


class FeedbackEvent(_Strict):
    event_id: Id = Field(description="The idempotency key: an event id already logged is not written again.")
    user_id: Id = Field(description="The user's id as in the data set (pseudonymized before it is logged).")
    item: Id = Field(description="The ad's id (an item of the served model version).")
    type: Literal["impression", "click", "conversion"] = Field(
        description="What happened: the ad was shown, clicked, or converted after a click (a purchase; it "
                    "counts towards the A/B report's CVR when it follows a click of the same user and item).")
    ts: float = Field(description="When, in unix seconds (an integer is accepted): at most serve.feedback_max_ahead_s "
                                  "ahead of the server's clock and at most serve.feedback_max_behind_s behind it.")
    context: Context = Field(default_factory=dict, description="The context the item was shown in.")
    # What the /recommend answer said about the shown item (impressions only): logged as sent, for
    # off-policy evaluation. The A/B arm is not among them: the server decides and logs it.
    position: int | None = Field(None, ge=0, description="Impressions: the item's 0-based position in the served "
                                                          "list (the answer's item.position).")
    propensity: float | None = Field(None, gt=0, le=1, description="Impressions: the probability that the serving "
                                                                   "policy put the item at that position, given "
                                                                   "the items above (the answer's item.propensity).")
    policy: Literal["greedy", "epsilon_greedy", "thompson"] | None = Field(
        None, description="Impressions: the policy that served the list (the answer's policy).")
    request_id: Id | None = Field(None, description="The served list's id (the answer's request_id).")

    @model_validator(mode="after")
    def _served_fields_on_impressions(self) -> FeedbackEvent:
        given = [f for f in ("position", "propensity", "policy") if getattr(self, f) is not None]
        if given and self.type != "impression":
            raise ValueError(f"{', '.join(given)}: only impressions carry them (this event is a {self.type})")
        if 0 < len(given) < 3:
            missing = [f for f in ("position", "propensity", "policy") if getattr(self, f) is None]
            raise ValueError(f"{', '.join(missing)} missing: an impression gives position, propensity and policy "
                             "together (from the /recommend answer), or none of them")
        return self

    @field_validator("ts")
    @classmethod
    def _ts_window(cls, ts: float, info: ValidationInfo) -> float:
        """Event time near the server's clock (validation context ``now``, ``max_ahead_s``, ``max_behind_s``):
        one event stamped in the far future (nanoseconds, say) would otherwise move the learner's
        watermark there and label every pending impression at once."""
        ctx = info.context or {}
        now = ctx.get("now")
        ahead, behind = ctx.get("max_ahead_s"), ctx.get("max_behind_s")
        window = "" if now is None else \
            f" (allowed: {ahead:g} s ahead, {'unbounded' if behind is None else f'{behind:g} s'} behind)"
        if ts < 0:
            raise ValueError(f"{ts:g} is negative: ts is unix seconds{window}")
        if now is None:
            return ts
        if ahead is not None and ts > now + ahead:
            raise ValueError(f"{ts:g} is {ts - now:.3g} s ahead of the server clock{window}")
        if behind is not None and ts < now - behind:
            raise ValueError(f"{ts:g} is {now - ts:.3g} s behind the server clock{window}")
        return ts


class FeedbackRequest(_Strict):
    events: list[FeedbackEvent] = Field(min_length=1, max_length=MAX_EVENTS, description="The events, in order.")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode_json(body: bytes) -> Any:
    """UTF-8 bytes -> JSON value, or :class:`ApiError` 400 saying what is wrong with the body."""
    if not body or not body.strip():
        raise ApiError(400, "request body is empty: send a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"request body is not valid UTF-8 (invalid byte at offset {err.start})") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        raise ApiError(400, f"request body is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except ValueError as err:  # NaN / Infinity
        raise ApiError(400, f"request body is not valid JSON: {err}") from None
    except RecursionError:
        raise ApiError(400, "request body is not valid JSON: nested too deeply") from None
    try:  # "\ud800" is valid JSON syntax but no Unicode text: it could not be hashed, logged or stored
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "request body holds an invalid Unicode escape (a lone surrogate)") from None
    except RecursionError:
        raise ApiError(400, "request body is not valid JSON: nested too deeply") from None
    return value


_UNION_TAGS = {"constrained-str", "str", "int"}


def describe_errors(err: ValidationError) -> list[str]:
    """One line per problem: ``where: what`` (the submitted value is never included)."""
    out: list[str] = []
    for e in err.errors(include_input=False, include_url=False):
        loc = list(e["loc"])
        if loc and loc[-1] in _UNION_TAGS:  # a context value: one message for both union members
            line = f"{'.'.join(str(p) for p in loc[:-1])}: must be a string (at most 256 characters) or an integer"
            if line not in out:
                out.append(line)
            continue
        where = ".".join(str(p) for p in loc) or "body"
        if e["type"] == "extra_forbidden":
            out.append(f"{where}: unknown field")
        elif e["type"] == "missing":
            out.append(f"{where}: field required")
        else:
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            out.append(f"{where}: {msg}")
    return out


def validate(model: type[BaseModel], data: Any, **context: Any) -> Any:
    if not isinstance(data, dict):
        raise ApiError(422, f"request body must be a JSON object, got {type(data).__name__ if data is not None else 'null'}")
    try:
        return model.model_validate(data, context=context or None)
    except ValidationError as err:
        details = describe_errors(err)
        raise ApiError(422, "invalid request: " + "; ".join(details[:5]) + (" ..." if len(details) > 5 else ""),
                       details) from None


def check_length_header(value: str | None, max_bytes: int) -> None:
    if value is None:
        return
    try:
        n = int(value)
    except ValueError:
        raise ApiError(400, "invalid Content-Length header") from None
    if n > max_bytes:
        raise ApiError(413, f"request body too large: {n} bytes, the limit is {max_bytes}")


async def read_body(request, max_bytes: int) -> bytes:
    """The request body, read with a cap (a lying or missing Content-Length is caught while reading)."""
    check_length_header(request.headers.get("content-length"), max_bytes)
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > max_bytes:
            raise ApiError(413, f"request body too large: more than {max_bytes} bytes")
    return bytes(buf)
