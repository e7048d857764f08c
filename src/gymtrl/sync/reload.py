"""The disk sync: write the weights as safetensors, have vLLM reload them in place (CPU, or vLLM on
the trainer's GPU without CUDA IPC).

Through gymtrl's worker extension (when vLLM runs it: gymtrl launches it so) the reload goes through
`gymtrl_reload`, which digests every tensor vLLM reads and stamps the load once it completed; without
it, through vLLM's own `reload_weights`, with no exact check (the logprob probe remains).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from gymtrl.distributed import is_zero3
from gymtrl.servers.vllm_control import VLLMControl
from gymtrl.sync.base import Expected, WeightSync, tied_head
from gymtrl.sync.receiver import receiver_rpc
from gymtrl.vllm_plugin.load_stamp import tensor_digest
from gymtrl.vllm_plugin.protocol import RELOAD_METHOD
HEAD_FILE = "tied_head.safetensors"


def write_untied_head(model, directory: Path) -> None:
    """Store a tied output head as its own tensor next to the checkpoint (see base.tied_head)."""
    found = tied_head(model)
    if found is None:
        return
    from safetensors.torch import save_file

    key, weight = found
    save_file({key: weight.detach().to("cpu").contiguous().clone()}, str(directory / HEAD_FILE),
              metadata={"format": "pt"})
    index = directory / "model.safetensors.index.json"
    if index.exists():  # sharded: loaders read only the files the index names
        data = json.loads(index.read_text())
        data["weight_map"][key] = HEAD_FILE
        index.write_text(json.dumps(data, indent=2))


def written_digests(directory: Path, tensors: dict) -> dict[str, str]:
    """The digest of every tensor in the directory's safetensors files, taken from the trainer's own
    tensors of that name (the file's bytes only for a name the trainer has not: none in practice)."""
    from safetensors import safe_open

    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                own = tensors.get(name)
                out[name] = tensor_digest(own.detach().to("cpu")) if own is not None else tensor_digest(f.get_tensor(name))
    return out


class ReloadSync(WeightSync):
    name = "reload"

    def __init__(self, control: VLLMControl, sync_dir: Path, stamped: bool = True):
        super().__init__()
        self.control = control
        self.sync_dir = Path(sync_dir)
        self.stamped = stamped  # vLLM runs gymtrl's worker extension: reload through it, stamped

    def push(self, model) -> float:
        start = time.monotonic()
        staging = self.sync_dir.with_name(self.sync_dir.name + ".staging")
        shutil.rmtree(staging, ignore_errors=True)
        # Under ZeRO-3 (inside full_weights) the parameters are whole only for now: hand their values
        # over, since save_pretrained does not gather DeepSpeed shards itself.
        state_dict = ({k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
                      if is_zero3(model) else None)
        model.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
        write_untied_head(model, staging)
        # Swap in whole: vLLM never reads a half-written directory.
        old = self.sync_dir.with_name(self.sync_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.sync_dir.exists():
            os.replace(self.sync_dir, old)
        os.replace(staging, self.sync_dir)
        shutil.rmtree(old, ignore_errors=True)
        t0 = time.monotonic()
        if self.stamped:
            tensors = dict(state_dict or model.state_dict())
            head = tied_head(model)
            if head is not None:
                tensors.setdefault(*head)
            expected = Expected(self.new_push_id(), written_digests(self.sync_dir, tensors))
            t1 = time.monotonic()
            receiver_rpc(self.control, RELOAD_METHOD, {"weights_path": str(self.sync_dir.resolve()),
                                                       "push": expected.push}, "reload the weights")
            self.expected = expected
            self.phases = {"digest_seconds": t1 - t0, "load_seconds": time.monotonic() - t1}
        else:
            self.control.reload_weights(str(self.sync_dir.resolve()))
            self.phases = {"load_seconds": time.monotonic() - t0}
        self.control.reset_prefix_cache()
        return time.monotonic() - start
