"""Batch conversion: a manifest of jobs, run in isolated processes, reported as one summary."""
