"""Parity: metrics, policies and reports comparing each converted model with its reference."""
