"""The projects. Each is one Task subclass in tasks/<name>/task.py, registered in modelworks.registry."""
