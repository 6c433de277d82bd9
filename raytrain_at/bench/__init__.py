"""Speed benchmarks of this machine behind ``raytrain-at bench step|loader|attack|eval``.

Each prints one JSON document (the figures BENCHMARKS.md records, with device, versions and
date); the GPU check and the preflight call the same functions. Speed is never asserted in a test.
"""
