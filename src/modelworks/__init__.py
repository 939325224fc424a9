"""modelworks: six classic deep-learning projects as production software, sharing one engine."""

__version__ = "0.1.0"
