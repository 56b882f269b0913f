"""A forced tool call's output as OpenAI's `tool_calls`: the grammar made the text a call (or
an array of calls); here it becomes the message's calls, each with an id of its own."""

import json
import secrets

from serve.server.protocol import FunctionCall, ToolCall
from serve.server.structured import ForcedCall


# --8<-- [start:tool_calls]
def tool_calls(text: str, call: ForcedCall) -> list[ToolCall] | None:
    """The calls in a tool-constrained output, or None when it is not whole: max_tokens (or a
    stop string) cut it before the grammar's end, and the caller answers the text as it is."""
    try:
        value = json.loads(text)
        if call.name is not None:  # the text is the named function's arguments
            return [_tool_call(call.name, text)]
        # tool_choice "required": [{"name": ..., "parameters": {...}}, ...]
        return [_tool_call(item["name"], json.dumps(item["parameters"], ensure_ascii=False))
                for item in value]
    except (ValueError, KeyError, TypeError):  # (a cut text that still parses: "[]", "[1]")
        return None


def _tool_call(name: str, arguments: str) -> ToolCall:
    return ToolCall(id=f"call_{secrets.token_hex(12)}",
                    function=FunctionCall(name=name, arguments=arguments))
# --8<-- [end:tool_calls]
