"""Data sets, downloads and formats, and on-device batch augmentation."""
