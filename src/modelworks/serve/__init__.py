"""The model server: FastAPI app factory, dynamic batching, A/B routing, Prometheus metrics and JSON logs.

Task-agnostic: each served version brings its task's predictor (typed request/response models, pre- and
post-processing) inside an `export.runtime.InferenceModel`; nothing here imports a task.
"""
