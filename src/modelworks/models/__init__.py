"""Model architectures shared by several tasks (the transformer decoder serves text generation and captioning)."""
