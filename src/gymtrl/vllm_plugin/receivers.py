"""The worker extension gymtrl starts vLLM with (`--worker-extension-cls`) for its own weight syncs:
CUDA IPC on one GPU (sync.strategy=ipc) and packed broadcasts between GPUs (sync.strategy=broadcast)."""

from .broadcast_receiver import BroadcastWeightReceiver
from .weight_receiver import IpcWeightReceiver


class WeightReceiver(IpcWeightReceiver, BroadcastWeightReceiver):
    pass
