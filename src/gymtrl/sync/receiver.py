"""Calls to gymtrl's worker extension inside vLLM (gymtrl.vllm_plugin.receivers), shared by the
syncs that go through it: reload, ipc and broadcast."""

from __future__ import annotations

from gymtrl.errors import ServerError, WeightSyncError
from gymtrl.servers.vllm import RECEIVER_CLASS
from gymtrl.servers.vllm_control import VLLMControl
from gymtrl.vllm_plugin.protocol import COMMIT_METHOD, INFO_METHOD, PAYLOAD_VERSION, STAMP_METHOD


def receiver_rpc(control: VLLMControl, method: str, kwargs: dict[str, str], what: str) -> list:
    """`/collective_rpc` to gymtrl's worker extension; a failure names where its cause is."""
    try:
        return control.collective_rpc(method, kwargs)
    except ServerError as e:
        # vLLM answers a worker's exception with a bare HTTP 500: its log has the cause.
        raise ServerError(
            f"the vLLM server did not {what}: {e.message}",
            hint=f"see vLLM's log; a server gymtrl did not launch needs `gymtrl vllm-plugin install --python "
            f"<vLLM's python>` and `--worker-extension-cls {RECEIVER_CLASS}`") from None


def check_receivers(control: VLLMControl) -> list[dict]:
    """Every vLLM worker runs this gymtrl's weight receiver (asked before the model loads, so a
    server started without it fails the run in seconds, not at the first push)."""
    infos = receiver_rpc(control, INFO_METHOD, {}, "answer gymtrl's weight receiver")
    versions = {i.get("version") if isinstance(i, dict) else None for i in infos}
    if versions != {PAYLOAD_VERSION}:
        raise WeightSyncError(f"vLLM's weight receivers answered {str(infos)[:300]}; this gymtrl speaks version "
                              f"{PAYLOAD_VERSION}", hint="install this gymtrl's plugin into vLLM's environment: "
                              "`gymtrl vllm-plugin install --python <vLLM's python>`")
    return infos


def commit_push(control: VLLMControl, push: str) -> None:
    """Every worker makes the push's digests its stamp (it refuses a push it did not see whole)."""
    receiver_rpc(control, COMMIT_METHOD, {"push": push}, "commit the weights it received")


def load_stamps(control: VLLMControl) -> list[dict]:
    """Each worker's stamp: {"push": id or None, "digests": {name: digest}}."""
    return receiver_rpc(control, STAMP_METHOD, {}, "report what it loaded")
