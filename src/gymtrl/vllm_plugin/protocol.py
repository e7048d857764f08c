"""What the trainer and gymtrl's code inside vLLM must agree on, in one place.

This module is a leaf (no imports): the trainer imports it as gymtrl.vllm_plugin.protocol, the plugin
inside vLLM's environment as gymtrl_vllm_plugin.protocol (relative imports), so both read the same
values. A change to the payloads bumps PAYLOAD_VERSION: each side refuses the other's on mismatch.
"""

# --- the prefix-correction plugin (splice.py, plugin.py) ---------------------------------------------
ENV_SWITCH = "GYMTRL_PREFIX_CORRECTION"  # "1" in vLLM's environment switches the correction on
REFUSAL_MARKER = "gymtrl-prefix-correction refused"  # in the HTTP 400 of a refused request

# --- the weight receivers (receivers.py and the modules it mixes in) ---------------------------------
PAYLOAD_VERSION = 3  # 2: push ids, committed load stamps, stamped reloads; 3: the word digest (load_stamp)
ALIGN_BYTES = 256  # every tensor starts on this boundary in a bucket, so any dtype view of it is aligned
DTYPES = ("bfloat16", "float16", "float32")  # the dtypes weights may travel in

# The worker-extension methods the trainer calls through vLLM's /collective_rpc.
INFO_METHOD = "gymtrl_receiver_info"          # version and worker rank
LOAD_PACKED_METHOD = "gymtrl_load_packed"     # ipc: load a bucket from a CUDA IPC buffer
JOIN_METHOD = "gymtrl_join_weight_group"      # broadcast: join the trainer's process group
RECEIVE_METHOD = "gymtrl_receive_bucket"      # broadcast: receive and load one bucket
RELOAD_METHOD = "gymtrl_reload"               # reload: vLLM's in-place reload from disk, stamped
COMMIT_METHOD = "gymtrl_commit_push"          # the pending digests of a push become the stamp
STAMP_METHOD = "gymtrl_load_stamp"            # the last committed push and its digests
