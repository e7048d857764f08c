"""gymtrl: GRPO training on NeMo Gym environments with Hugging Face TRL."""

__version__ = "0.1.0"
