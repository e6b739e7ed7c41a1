"""Ray Serve applications of adrec (see ``config.yaml``)."""
