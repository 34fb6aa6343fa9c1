"""Adapters to training frameworks; imported by hand, never discovered (each needs its own extra)."""
