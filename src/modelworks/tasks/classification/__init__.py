"""Project 1: image classification."""
