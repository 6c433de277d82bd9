"""``python tune_stem.py [--space tune_spaces/NAME.yaml] [--address auto] ...``: a Ray Tune study.

A thin entry point, run from the repository root: it is ``raytrain-at tune`` (see
``raytrain_at/tuning/study.py``). Without arguments it runs the quick ConvStem search on the
bundled digits on this machine's CPUs (tune_spaces/quick_stems_cpu.yaml).
"""

import sys

from raytrain_at.cli import main

if __name__ == "__main__":
    main(["tune", *sys.argv[1:]])
