"""Export a trained run into a verified model package, and run packages with any runtime.

Task-agnostic: the graph, its inputs, the checks' metrics and the predictor all come from the task object the
caller passes in (the CLI finds it in the registry); nothing here imports a task.
"""
