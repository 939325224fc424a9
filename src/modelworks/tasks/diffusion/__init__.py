"""Project 4: diffusion image synthesis."""
