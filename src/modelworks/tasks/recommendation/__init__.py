"""Project 6: recommendation."""
