#!/usr/bin/env python
"""Regenerate the demo's bundled models (rewardtune/demo/models/) from scratch on a CPU.

    python scripts/build_demo_models.py                 # everything, into rewardtune/demo/models
    python scripts/build_demo_models.py --work /tmp/b --only unet   # one part, reusing an earlier --work

See docs/demo.md for what each step trains and how long it takes.
"""

import sys

from rewardtune.demo.build import main

if __name__ == "__main__":
    sys.exit(main())
