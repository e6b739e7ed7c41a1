"""Serve's floor for the serving benchmark: the same HTTP path with no model behind it.

One FastAPI deployment whose ``POST /recommend`` answers a constant top-k of the served shape. What the
proxy, one replica hop and the load client cost is then measured, not guessed; the distance from it to a
topology is the model's work. (No ``from __future__ import annotations`` here: FastAPI must see the
``Request`` annotation as the class to inject the request.)
"""

from fastapi import FastAPI, Request
from ray import serve

VERSION = "floor"


def floor_app(replicas: int, num_cpus: float, max_ongoing_requests: int):
    api = FastAPI()

    @serve.deployment(name="Floor")
    @serve.ingress(api)
    class Floor:
        @api.post("/recommend")
        async def recommend(self, request: Request) -> dict:
            body = await request.json()
            items = [{"item": str(i), "click_prob": 0.0, "relevance": None, "rank": i + 1}
                     for i in range(int(body.get("k", 10)))]
            return {"user_id": body.get("user_id"), "version": VERSION, "ranked_by": "click_prob", "items": items}

    return Floor.options(num_replicas=replicas, max_ongoing_requests=max_ongoing_requests,
                         ray_actor_options={"num_cpus": num_cpus}).bind()
