"""Speed benchmarks of this machine behind ``raytrain-at bench step|loader|attack|eval``.

Each prints one JSON document (the figures BENCHMARKS.md records, with device, versions and
date); the GPU check (``scripts/gpu_check.sh``) runs the same commands. Speed is never asserted
in a test.
"""
