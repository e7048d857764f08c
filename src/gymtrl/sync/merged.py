"""A LoRA-trained model (PEFT) seen as the plain model it amounts to: every adapted weight is
W + the adapter's delta, under the base model's own names. The whole-weight syncs (reload, ipc,
broadcast) push this view when model.lora trains an adapter and sync.strategy names one of them, so
vLLM serves the merged model without LoRA support. Nothing in the trainer's model is modified (no
merge and unmerge round trip that would round the base weights): the merged tensors are new ones,
computed at each push (one model's worth of memory while the push runs).
"""

from __future__ import annotations

BASE_LAYER = ".base_layer"


def is_peft(model) -> bool:
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


class MergedView:
    """What the syncs read of a model (names and tensors, config, output head), merged."""

    def __init__(self, peft_model):
        self.peft_model = peft_model
        self.base = peft_model.get_base_model()
        self.config = self.base.config
        self.adapter = peft_model.active_adapter

    def _merged(self, items):
        import torch

        modules = dict(self.base.named_modules())
        with torch.no_grad():
            for name, tensor in items:
                if ".lora_" in name:
                    continue
                if name.endswith(f"{BASE_LAYER}.weight"):
                    layer = modules[name[:-len(f"{BASE_LAYER}.weight")]]
                    if self.adapter in getattr(layer, "lora_A", {}):
                        tensor = tensor + layer.get_delta_weight(self.adapter).to(tensor.dtype)
                yield name.replace(BASE_LAYER, ""), tensor

    def named_parameters(self):
        return self._merged(self.base.named_parameters())

    def parameters(self):
        return (p for _, p in self.named_parameters())

    def state_dict(self) -> dict:
        return dict(self._merged(self.base.state_dict().items()))

    def save_pretrained(self, directory, safe_serialization: bool = True, state_dict: dict | None = None) -> None:
        self.base.save_pretrained(directory, safe_serialization=safe_serialization,
                                  state_dict=state_dict if state_dict is not None else self.state_dict())

    def get_output_embeddings(self):
        return self.base.get_output_embeddings()

    def named_modules(self):
        return self.base.named_modules()


def as_pushed(model, sync_name: str):
    """The model a sync pushes: the merged view of an adapter-trained model for the whole-weight
    syncs, else the model itself (the lora sync pushes the adapter)."""
    return MergedView(model) if sync_name != "lora" and is_peft(model) else model
