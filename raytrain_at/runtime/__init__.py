"""Where the package runs: local ports and the process environment."""
