"""What a request's output must match, from whichever field says it: OpenAI's `response_format`,
vLLM's extra `structured_outputs`, or `tools` with a `tool_choice` that forces a call. Each
becomes the engine's StructuredOutputsParams, and remembers the field it came from, so that a
constraint the engine refuses (serve/engine/constraints.py) is a 400 naming what the client
wrote: `tools[1].function.parameters`, not the engine's `structured_outputs.json`.
"""

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, WrapValidator

from serve.engine.errors import InvalidRequestError
from serve.server.fields import JSONSchema, JSONSchemaText, ReportOneBranch, RequestModel, Text
from serve.structured.params import StructuredOutputsParams

# A tool whose parameters are not given takes none: its call's arguments are always {} (vLLM's).
NO_PARAMETERS = {"type": "object", "properties": {}}


# --8<-- [start:fields]
class JSONSchemaFormat(RequestModel):
    name: Text
    description: str | None = None
    schema_: JSONSchema | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the output is held to the schema either way


class ResponseFormat(RequestModel):
    """OpenAI's response_format: text (no constraint), any JSON object, or a JSON schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(RequestModel):
    """vLLM's structured_outputs: exactly one of these (serve/structured/params.py)."""

    json_: Annotated[
        JSONSchema | JSONSchemaText | None,
        WrapValidator(ReportOneBranch("a JSON schema (an object) or its text",
                                      {"object": JSONSchema, "string": JSONSchemaText})),
    ] = Field(default=None, alias="json")
    regex: Text | None = None
    choice: list[Text] | None = None
    grammar: Text | None = None  # EBNF, in xgrammar's dialect
    json_object: bool | None = None


class FunctionDefinition(RequestModel):
    name: Text = Field(min_length=1)
    description: str | None = None
    parameters: JSONSchema | None = None  # the schema of the call's arguments (an object)
    strict: bool | None = None  # a forced call is held to the schema either way


class Tool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(RequestModel):
    name: Text


class NamedToolChoice(RequestModel):
    """{"type": "function", "function": {"name": ...}}: the output is a call of that function."""

    type: Literal["function"]
    function: FunctionName


ToolChoice = Annotated[
    Literal["none", "auto", "required"] | NamedToolChoice | None,
    WrapValidator(ReportOneBranch(
        "'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}",
        {"string": Literal["none", "auto", "required"], "object": NamedToolChoice},
    )),
]
# --8<-- [end:fields]


@dataclass(frozen=True)
class ForcedCall:
    """The output is a tool call: the arguments of the function `name`, or, when name is None
    (tool_choice "required"), a JSON array of {"name", "parameters"} calls of any of the tools."""

    name: str | None


@dataclass(frozen=True)
class Constraint:
    """What the output must match, where the request said it (a path: "response_format",
    "tools[2].function.parameters"), and whether the output is a tool call."""

    params: StructuredOutputsParams
    field: str
    call: ForcedCall | None = None

    @classmethod
    def build(cls, field: str, call: ForcedCall | None = None, **spec: Any) -> "Constraint":
        try:
            return cls(StructuredOutputsParams(**spec), field, call)
        except ValueError as error:  # "structured_outputs.choice must be ..." -> the field's
            raise InvalidRequestError(renamed(str(error), field), top_field(field)) from None

    @property
    def param(self) -> str:
        return top_field(self.field)


def top_field(path: str) -> str:
    """A field path's top-level field: "tools[1].function.parameters" -> "tools"."""
    return re.match(r"[^.\[]*", path).group()


def renamed(message: str, field: str) -> str:
    """A message about the engine's `structured_outputs[.kind]`, naming the request's field
    instead (as is, when that is structured_outputs)."""
    if top_field(field) == "structured_outputs":
        return message
    return re.sub(r"^structured_outputs(\.\w+)?", field, message)


# --8<-- [start:constraints]
def response_format_constraint(response_format: ResponseFormat | None) -> Constraint | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return Constraint.build("response_format", json_object=True)
    if response_format.json_schema is None or response_format.json_schema.schema_ is None:
        raise InvalidRequestError("response_format.json_schema.schema is required for "
                                  "response_format of type 'json_schema'", "response_format")
    return Constraint.build("response_format.json_schema.schema",
                            json=response_format.json_schema.schema_)


def structured_outputs_constraint(given: StructuredOutputs | None) -> Constraint | None:
    if given is None:
        return None
    return Constraint.build("structured_outputs", json=given.json_, regex=given.regex,
                            choice=given.choice, grammar=given.grammar,
                            json_object=bool(given.json_object))


def tools_constraint(tools: list[Tool] | None, tool_choice: str | NamedToolChoice | None,
                     parallel_tool_calls: bool | None) -> Constraint | None:
    """A forced call's constraint. "auto" forces nothing: the answer is text, as it may be
    under "auto" at OpenAI too. Recognizing a call the model chose to write in free text takes
    a parser made for that model's call format (vLLM's --tool-call-parser), and no model here
    has one; constraining every "auto" answer to a call would force calls the client left to
    the model."""
    if tool_choice in (None, "none", "auto"):
        return None
    if not tools:
        shown = repr(tool_choice) if isinstance(tool_choice, str) else "naming a function"
        raise InvalidRequestError(f"tool_choice {shown} needs tools, and the request has none",
                                  "tool_choice")
    if tool_choice == "required":
        return Constraint.build("tools", ForcedCall(None),
                                json=calls_schema(tools, parallel_tool_calls is not False))
    name = tool_choice.function.name
    index = next((i for i, tool in enumerate(tools) if tool.function.name == name), None)
    if index is None:
        raise InvalidRequestError(f"tool_choice names the function {name!r}, which is not one "
                                  "of tools", "tool_choice")
    return Constraint.build(f"tools[{index}].function.parameters", ForcedCall(name),
                            json=tools[index].function.parameters or NO_PARAMETERS)
# --8<-- [end:constraints]


# --8<-- [start:calls_schema]
def calls_schema(tools: list[Tool], parallel: bool) -> dict:
    """The schema of tool_choice "required"'s output, vLLM's shape: an array of one call or
    more (one, if parallel calls are off), each {"name": one tool's, "parameters": its
    arguments}. Definitions ($defs) move to the top, where a tool's "$ref"s still find them."""
    definitions: dict[str, Any] = {}
    calls = []
    for i, tool in enumerate(tools):
        parameters = dict(tool.function.parameters or NO_PARAMETERS)
        for name, definition in parameters.pop("$defs", {}).items():
            if definitions.setdefault(name, definition) != definition:
                raise InvalidRequestError(f"tools[{i}].function.parameters defines {name!r} "
                                          "in $defs differently from another tool",
                                          "tools")
        calls.append({"properties": {"name": {"type": "string", "enum": [tool.function.name]},
                                     "parameters": parameters},
                      "required": ["name", "parameters"]})
    schema = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    if definitions:
        schema["$defs"] = definitions
    return schema
# --8<-- [end:calls_schema]
