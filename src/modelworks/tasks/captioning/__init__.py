"""Project 5: image captioning."""
