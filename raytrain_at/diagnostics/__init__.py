"""Diagnostics that measure how the code runs (not part of training itself)."""
