"""Data: sources (ImageNet folders, RobustBench ids, bundled small datasets)."""
