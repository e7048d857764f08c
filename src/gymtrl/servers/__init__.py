"""Server processes gymtrl starts: command builders (vllm.py, gym.py) and supervision (process.py)."""
