"""Training and evaluating the ICT and HP reward models on preference triplets.

``train_reward(TrainRewardConfig(...)) -> metrics``; ``evaluate_rewards(root, split, {name: reward}) -> table``.
"""

from ..lazy import lazy_exports

# imported on first use: ``rewardtune.reward_training.config`` (for --help) must not pull in torch
__getattr__ = lazy_exports(
    __name__,
    {
        "TrainRewardConfig": "config",
        "evaluate_rewards": "evaluate",
        "score_triplets": "evaluate",
        "triplet_accuracy": "evaluate",
        "train_reward": "train",
    },
)

__all__ = ["TrainRewardConfig", "evaluate_rewards", "score_triplets", "train_reward", "triplet_accuracy"]
