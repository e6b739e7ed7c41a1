"""CPU time of one served ``/recommend``'s model work, in-process: what a fused Ingress replica computes per request.

The request algorithm (:class:`~adrec.serving.request.Recommendation`) and the batched ranking body
(:func:`~adrec.serving.scoring.score_requests`) on a model version, one thread (as a replica), over known users
and 10% unknown ones with one context, ``--requests`` requests after 50 of warm-up. CPU time, not wall time:
other load on the machine inflates it far less than latency. Run it in two checkouts on the same version to
compare code; ``--profile`` prints the top of a cProfile by own time.

    python -m benchmarks.request_cpu RUN/versions/000001 [--requests 440] [--profile]
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("version", help="a local model version folder (RUN/versions/<n>)")
    p.add_argument("--requests", type=int, default=440)
    p.add_argument("--profile", action="store_true")
    a = p.parse_args(argv)

    from adrec.serving.recommender import Recommender
    from adrec.serving.replica import single_threaded
    from adrec.serving.request import Recommendation
    from adrec.serving.scoring import score_requests

    single_threaded()
    rec = Recommender(a.version, None, True)
    rec.precompute_lists(100, 100_000)
    known = list(rec.version.user_pos)
    n_unknown = a.requests // 10
    users = [known[i % len(known)] for i in range(a.requests - n_unknown)] + [f"nobody-{i}" for i in range(n_unknown)]
    ctx = {"slot": "1", "hour": "12", "device": "mobile"}

    def one(u: str) -> dict:
        ui = rec.pseudonym_index(u)
        req = Recommendation(rec, ui, 10, ctx, 100)
        if len(req.to_score):
            sc = score_requests(rec, [ui], [req.to_score], [ctx])[0]
            req.set_click_probs(sc["scores"], sc.get("ctcvr"))
        return req.answer()

    for u in users[:50]:
        one(u)
    c0 = time.process_time()
    for u in users:
        one(u)
    print(f"CPU ms/request: {(time.process_time() - c0) * 1e3 / len(users):.2f} ({len(users)} requests)")
    if a.profile:
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        for u in users:
            one(u)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
