"""The library's rooms besides projectors and objectives: null spaces, methods, schedules, integrations."""
