"""Field types the request bodies share: text, token ids, stop strings, JSON schemas, and unions
that report what is wrong with the value the client actually sent."""

import json
import re
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

from serve.sampling_params import (
    LOGIT_BIAS_RANGE,
    MAX_LOGIT_BIAS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
)


class RequestModel(BaseModel):
    """A request body or a part of one."""

    # Unknown fields are accepted and ignored (as vLLM does). Strict: a number must be a JSON
    # number and a flag a JSON boolean ("5" and true are not a max_tokens, true is not a
    # temperature), as OpenAI answers; an integer is a valid float.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)


# One request may hold several prompts, n sequences each, each becoming an engine request: bound
# how many, so that one body of a million one-character prompts cannot flood the queue. (OpenAI
# caps an embeddings input array at 2048 items.)
MAX_PROMPTS = 2048
# A JSON schema nested deeper than this many levels (objects and arrays, as JSON nests them) is
# refused: xgrammar's time to read a schema grows with the cube of its depth (100 levels of
# objects take a tenth of a second, 200 most of one), and Python cannot even serialize one
# nested some 500 deep. OpenAI's own limit is 10 levels of objects, some 20 JSON levels.
MAX_SCHEMA_DEPTH = 64
MAX_SHOWN_KEY_CHARS = 40  # a refused logit_bias key is quoted up to this long


def _valid_unicode(text: str) -> str:
    # JSON may spell a lone surrogate ("\ud800"), which no tokenizer can encode and no response
    # can carry as UTF-8: refuse it here, by field, instead of failing deep in the engine.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise PydanticCustomError("unicode", "should be valid Unicode (it holds a lone "
                                  "surrogate at index {index})", {"index": error.start}) from None
    return text


def json_kind(value: Any) -> str:
    """The JSON kind of a parsed value: "string", "number", "array", ..."""
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):  # before int: a bool is an int in Python
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null" if value is None else type(value).__name__


class ReportOneBranch:
    """A union's validator that, on failure, reports the errors of one branch only.

    Pydantic reports a failed union once per branch: `"stop": 5` gets "should be a valid string"
    and "should be a valid list", rules the client never meant to follow. Here the branch is the
    one the value's JSON kind picks (for an array, first by the kind of its first item:
    "array of number", then "array"), and a value of no branch's kind gets one line that lists
    what the field may be.
    """

    def __init__(self, expected: str, branches: dict[str, Any]) -> None:
        self.expected = expected
        self.branches = {kind: TypeAdapter(branch) for kind, branch in branches.items()}

    def __call__(self, value: Any, handler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            branch = self._branch_for(value)
            if branch is None:
                raise PydanticCustomError("union_type", "should be {expected}",
                                          {"expected": self.expected}) from None
            branch.validate_python(value)  # raises that branch's errors, at their own paths
            raise  # (not reached: a branch that accepts the value makes the union accept it)

    def _branch_for(self, value: Any) -> TypeAdapter | None:
        kind = json_kind(value)
        if kind == "array" and value:
            return self.branches.get(f"array of {json_kind(value[0])}", self.branches.get(kind))
        return self.branches.get(kind)


def nesting_depth(value: Any) -> int:
    """How deep a parsed JSON value nests (a scalar 0, [] or {} 1), walked without recursion."""
    depth, level = 0, [value]
    while level := [node for node in level if isinstance(node, dict | list)]:
        depth += 1
        level = [child for node in level
                 for child in (node.values() if isinstance(node, dict) else node)]
    return depth


def _shallow_schema(schema: dict[str, Any]) -> dict[str, Any]:
    if nesting_depth(schema) > MAX_SCHEMA_DEPTH:
        raise _too_deep()
    return schema


def _shallow_schema_text(text: str) -> str:
    try:
        schema = json.loads(text)
    except RecursionError:  # deeper than Python's stack
        raise _too_deep() from None
    except ValueError:  # not JSON: the engine's grammar builder says where
        return text
    _shallow_schema(schema)
    return text


def _too_deep() -> PydanticCustomError:
    return PydanticCustomError("schema_depth", "should be nested at most {limit} levels deep",
                               {"limit": MAX_SCHEMA_DEPTH})


# A logit_bias key: a token id written as a JSON string (object keys are strings). Ten digits
# are more than any vocabulary needs; the engine checks the id against the model's.
_TOKEN_ID_KEY = re.compile(r"[0-9]{1,10}")


def _few_entries(value: Any) -> Any:
    # Counted before the entries are validated: 10,000 of them are refused in one line, not
    # 10,000 lines of what is wrong with each.
    if isinstance(value, dict) and len(value) > MAX_LOGIT_BIAS:
        raise PydanticCustomError("logit_bias_size",
                                  "should have at most {limit} entries, got {count}",
                                  {"limit": MAX_LOGIT_BIAS, "count": len(value)})
    return value


def _token_id_keys(bias: dict[str, float]) -> dict[int, float]:
    bad = next((key for key in bias if not _TOKEN_ID_KEY.fullmatch(key)), None)
    if bad is not None:
        raise PydanticCustomError(
            "logit_bias_key", "should map token ids (integers, written as strings) to biases, "
            "got the key {key}", {"key": json.dumps(bad[:MAX_SHOWN_KEY_CHARS])})
    return {int(token): bias for token, bias in bias.items()}


Text = Annotated[str, AfterValidator(_valid_unicode)]
# A JSON schema, as an object (an output constraint's, a tool's parameters), or as its text
JSONSchema = Annotated[dict[str, Any], AfterValidator(_shallow_schema)]
JSONSchemaText = Annotated[str, AfterValidator(_valid_unicode),
                           AfterValidator(_shallow_schema_text)]
TokenId = Annotated[int, Strict(), Field(ge=0)]  # strict: true and "5" are not token ids
TokenIds = list[TokenId]

StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS),
                       AfterValidator(_valid_unicode)]
StopStrings = Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]
Stop = Annotated[StopString | StopStrings | None, WrapValidator(ReportOneBranch(
    "a string or an array of strings", {"string": StopString, "array": StopStrings}))]
StopTokenIds = Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)]

# What /v1/completions takes as its prompt: one text, several, one list of token ids, several.
Texts = Annotated[list[Text], Field(max_length=MAX_PROMPTS)]
TokenIdLists = Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS)]
Prompt = Annotated[
    Text | Texts | TokenIds | TokenIdLists,
    WrapValidator(ReportOneBranch(
        "a string, an array of strings, an array of token ids or an array of token-id arrays",
        {"string": Text, "array of string": Texts, "array of number": TokenIds,
         "array of array": TokenIdLists},
    )),
]

# OpenAI's logit_bias: {"token id": bias in [-100, 100]}, at most MAX_LOGIT_BIAS entries; the
# keys become ints here.
Bias = Annotated[float, Field(ge=-LOGIT_BIAS_RANGE, le=LOGIT_BIAS_RANGE)]
LogitBias = Annotated[dict[str, Bias], BeforeValidator(_few_entries),
                      AfterValidator(_token_id_keys)]
