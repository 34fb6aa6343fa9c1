"""The built-in null spaces, one module each: ``exact`` (tau = 1) and ``svd`` (energy threshold tau)."""
