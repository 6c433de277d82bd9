"""``raytrain-at preflight``: checks a run before it spends money (see docs/preflight.md)."""
