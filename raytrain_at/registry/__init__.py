"""The MLflow model registry: registering evaluated models, champions, the leaderboard."""
