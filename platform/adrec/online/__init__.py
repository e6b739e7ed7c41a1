"""Online learning from click feedback (see :mod:`adrec.online.learner`)."""
