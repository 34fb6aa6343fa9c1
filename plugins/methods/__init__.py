"""The built-in teleport methods, one module each: ``null_space`` (the default), ``symmetry``, ``level_set``."""
