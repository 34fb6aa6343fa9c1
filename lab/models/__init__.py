"""The model zoo, one module per family (registered by name for configs), and the Mamba-1 block."""
