"""Project 3: text generation with a GPT (language_model task)."""
