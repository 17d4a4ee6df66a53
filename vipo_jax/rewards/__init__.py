"""Rewards and evaluation metrics, registered by name (``registry``): pixel rewards (``pixels``),
rewards that live on the subject or the background (``regions``), the
CLIP family (``clip_scores``: HPSv2.1, PickScore, CLIP score), ImageReward (``image_reward``),
VideoAlign (``videoalign``: VQ / MQ / TA of whole clips), and image rewards scored per video frame
(``frames``). The toy world registers its own (``vipo_jax.toy``).
Importing this package registers the built-in rewards."""

from vipo_jax.rewards import clip_scores, image_reward, pixels, regions, videoalign
from vipo_jax.rewards.registry import (
    REWARDS,
    LoadedReward,
    RewardContext,
    RewardEntry,
    available,
    evaluation_names,
    get,
    register,
    reward_weights,
    unregister,
)

__all__ = ["REWARDS", "LoadedReward", "RewardContext", "RewardEntry", "available", "clip_scores", "evaluation_names",
           "get", "image_reward", "pixels", "regions", "register", "reward_weights", "unregister", "videoalign"]
