"""Project 2: object detection."""
