"""Dataset rows: reading and validating NeMo Gym JSONL (shared with prepare-data)."""
