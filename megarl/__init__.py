"""megarl: Megatron-core based reinforcement-learning post-training for Mixture-of-Experts LLMs."""

__version__ = "0.1.0"
