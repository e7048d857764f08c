"""Evaluation on held-out rows: `gymtrl eval` (cli.py) and the in-training EvalCallback (callback.py),
both through the training rollout path (stats.py: the numbers, run.py: the rollouts)."""
