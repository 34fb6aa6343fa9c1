"""Built-in projectors, one module per architecture, each registered as a plugin."""
