"""``python -m rewardtune.testing [OUT]``: write the tiny reward world (backbone, ICT, HP, images) to OUT."""

import sys

from .clip import write_tiny_reward_world

print(write_tiny_reward_world(sys.argv[1] if len(sys.argv) > 1 else "tiny-world"))
