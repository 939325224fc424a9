"""Task-agnostic training machinery. Nothing in here imports a task (a test enforces it)."""
