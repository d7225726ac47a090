"""Streaming calibration: per-tensor statistics in bounded memory, and ranges computed from them."""
