"""gymtrl prepare-data: validated, routed, mixed training and validation JSONL from many sources."""
