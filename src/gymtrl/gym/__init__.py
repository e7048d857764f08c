"""Talking to NeMo Gym over HTTP: discovery and routing (discovery.py), the agent client (client.py)."""
