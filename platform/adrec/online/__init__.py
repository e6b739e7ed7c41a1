"""Online learning from click feedback: the model keeps learning while it serves, and nothing is lost.

- :class:`adrec.online.learner.OnlineLearner`: feedback log (from a checkpointed position) ->
  attribution join (:mod:`.attribution`) -> progressive validation (:mod:`.metrics`) -> FTRL / AdaGrad /
  SGD updates of the ranker's head, fusion and embedding layers (:mod:`.optim`) -> guarded publication of
  model versions (:mod:`.publish`) with new users and clicks folded into the candidate sources
  (:mod:`.catalog`); log position and state in one atomic checkpoint (:mod:`.checkpoint`).
- :mod:`adrec.online.actor`: the learner as a Ray actor beside the Serve app (:func:`start_learner`,
  :func:`serve_with_learner`), rolling published versions out to Serve.
- ``adrec online --run RUN`` (:mod:`.foreground`): the learner on its own, in the foreground.
- :mod:`adrec.online.supervise`: a failing learner restarts from its checkpoint (bounded, with backoff),
  then reports itself unhealthy; it never idles silently.

The benchmark of frozen vs online through a preference drift is ``benchmarks/online.py``, outside the library.
"""
