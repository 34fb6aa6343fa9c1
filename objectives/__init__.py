"""Built-in teleport objectives, each registered as a plugin."""
