"""Tracking: the only package that imports mlflow (runs, logged models, registry, leaderboard)."""
