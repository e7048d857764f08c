"""Rollouts: from a batch of TRL prompts to NeMo Gym `/run` replies to training tensors."""
