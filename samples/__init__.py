"""Bundled sample models and their data for onnxforge."""
