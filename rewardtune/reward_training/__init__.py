"""Training and evaluating the ICT and HP reward models on preference triplets.

``train_reward(TrainRewardConfig(...)) -> metrics``; ``evaluate_rewards(root, split, {name: reward}) -> table``.
"""

from .config import TrainRewardConfig
from .evaluate import evaluate_rewards, score_triplets, triplet_accuracy
from .train import train_reward

__all__ = ["TrainRewardConfig", "evaluate_rewards", "score_triplets", "train_reward", "triplet_accuracy"]
