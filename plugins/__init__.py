"""Built-in plugins that are neither projectors nor objectives: null spaces, schedules, models, data."""
