"""The worker extension gymtrl starts vLLM with (`--worker-extension-cls`) for its own weight syncs:
CUDA IPC on one GPU (sync.strategy=ipc), packed broadcasts between GPUs (sync.strategy=broadcast)
and in-place reloads from disk (sync.strategy=reload), each stamped with the exact digests of what
it loaded (load_stamp)."""

from .broadcast_receiver import BroadcastWeightReceiver
from .load_stamp import LoadStamp
from .weight_receiver import IpcWeightReceiver


class WeightReceiver(IpcWeightReceiver, BroadcastWeightReceiver, LoadStamp):
    pass
