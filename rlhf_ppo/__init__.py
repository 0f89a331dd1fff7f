"""rlhf_ppo: align a causal language model to a reward model with PPO."""

from .config import Config, ConfigError, load_config
from .models import load_policy
from .trainer import PPOTrainer

__all__ = ["Config", "ConfigError", "PPOTrainer", "load_config", "load_policy"]
__version__ = "0.1.0"
