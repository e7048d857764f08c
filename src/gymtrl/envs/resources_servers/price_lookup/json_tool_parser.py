"""A vLLM tool parser for models that write their tool calls as JSON without Hermes tags.

    vllm serve MODEL --enable-auto-tool-choice \
        --tool-parser-plugin src/gymtrl/envs/resources_servers/price_lookup/json_tool_parser.py \
        --tool-call-parser json_anywhere

Qwen2.5-Coder-0.5B-Instruct (as `gymtrl models fetch` builds it) answers a tool question with
`{"name": ..., "arguments": ...}`, bare or in a ```json fence, and never in `<tool_call>` tags
(0 of ~300 samples; the measurement is in docs/LOG.md), so vLLM's hermes parser finds no call and every
tool episode scores 0. This parser takes every JSON object with a "name" and "arguments" (or
"parameters") anywhere in the reply, tagged or not: vLLM's llama3_json parser, minus its
requirement that the tokenizer hold Llama's `<|python_tag|>` token. Non-streaming replies only
(NeMo Gym's model server does not stream).
"""

from vllm.tool_parsers.abstract_tool_parser import ToolParserManager
from vllm.tool_parsers.llama_tool_parser import Llama3JsonToolParser


@ToolParserManager.register_module("json_anywhere")
class JsonAnywhereToolParser(Llama3JsonToolParser):
    # Llama3JsonToolParser looks this token up in the vocabulary at start-up and refuses a tokenizer
    # without it; Qwen's vocabulary has <tool_call>. Extraction itself looks for "{" anywhere.
    bot_token = "<tool_call>"
