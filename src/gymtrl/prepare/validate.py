"""Row checks: NeMo Gym's request schema, and the fields each environment's verifier reads.

A check returns the reason a row is bad ("<kind>: <detail>"), or None. The kind (before the colon)
is what the report counts skipped rows by.
"""

from __future__ import annotations

from gymtrl.config.checks import VERIFIER_FIELDS

# NeMoGymResponseCreateParamsNonStreaming in NeMo Gym 0.7.0 (nemo_gym/openai_utils.py) is strict
# (extra="forbid"): any other key in responses_create_params is a 422 from every agent's /run.
RESPONSES_CREATE_PARAMS_KEYS = frozenset({
    "background", "context_management", "conversation", "include", "input", "instructions",
    "max_output_tokens", "max_tool_calls", "metadata", "model", "moderation", "parallel_tool_calls",
    "previous_response_id", "prompt", "prompt_cache_key", "prompt_cache_retention", "reasoning",
    "safety_identifier", "service_tier", "store", "stream", "stream_options", "temperature", "text",
    "tool_choice", "tools", "top_logprobs", "top_p", "truncation", "user",
})
MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant"})
ITEM_TYPES = frozenset({"message", "function_call", "function_call_output", "reasoning"})



def schema_problem(row: object) -> str | None:
    """NeMo Gym's BaseRunRequest: a responses_create_params object with strict keys and an input."""
    if not isinstance(row, dict):
        return f"not_an_object: a row must be a JSON object, got {type(row).__name__}"
    params = row.get("responses_create_params")
    if not isinstance(params, dict):
        return "schema: no 'responses_create_params' object"
    unknown = sorted(set(params) - RESPONSES_CREATE_PARAMS_KEYS)
    if unknown:
        return (f"schema: responses_create_params has key(s) NeMo Gym rejects: {', '.join(unknown)} "
                "(sampling extras go in metadata.extra_body)")
    if "input" not in params:
        return "schema: responses_create_params has no 'input'"
    problem = _input_problem(params["input"])
    if problem:
        return f"schema: {problem}"
    problem = _tools_problem(params.get("tools"))
    if problem:
        return f"schema: {problem}"
    metadata = params.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        return "schema: responses_create_params.metadata must map keys to strings (JSON-encode nested values)"
    return None


def _input_problem(value: object) -> str | None:
    if isinstance(value, str):
        return None if value else "input is an empty string"
    if not isinstance(value, list) or not value:
        return "input must be a string or a non-empty list of items"
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            return f"input[{i}] is not an object"
        kind = item.get("type", "message")
        if kind not in ITEM_TYPES:
            return f"input[{i}] has unknown type '{kind}'"
        if kind == "message":
            if item.get("role") not in MESSAGE_ROLES:
                return f"input[{i}] has role {item.get('role')!r} (expected one of {', '.join(sorted(MESSAGE_ROLES))})"
            if not isinstance(item.get("content"), (str, list)):
                return f"input[{i}] has no string or list 'content'"
        elif kind == "function_call" and not (isinstance(item.get("name"), str) and isinstance(item.get("arguments"), str)):
            return f"input[{i}] function_call needs string 'name' and 'arguments'"
        elif kind == "function_call_output" and not isinstance(item.get("call_id"), str):
            return f"input[{i}] function_call_output needs a string 'call_id'"
    return None


def _tools_problem(tools: object) -> str | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        return "tools must be a list"
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            return f"tools[{i}] must be an object with type 'function'"
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            return f"tools[{i}] has no name"
        if not isinstance(tool.get("parameters", {}), (dict, type(None))):
            return f"tools[{i}].parameters must be a JSON schema object"
    return None


def _lookup(row: dict, dotted: str) -> object:
    value: object = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def verifier_problem(row: dict, env: str | None) -> str | None:
    """The fields `env`'s verifier needs, present and not null."""
    if env is None:
        return None
    for spec in VERIFIER_FIELDS[env]:
        names = spec.split("|")
        if all(_lookup(row, name) is None for name in names):
            return f"missing_field: {env} verifies with {' or '.join(repr(n) for n in names)}, which the row lacks"
    return None


def infer_env(agent: str | None) -> str | None:
    """The environment an agent instance serves, by NeMo Gym's naming (<env>_simple_agent etc.)."""
    if not agent:
        return None
    matches = [env for env in VERIFIER_FIELDS if agent == env or agent.startswith(env + "_")]
    return max(matches, key=len) if matches else None
