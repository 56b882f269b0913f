"""The checks a generation request passes before it reaches the engine; each names a field."""

from serve.sampling_params import SamplingParams
from serve.server.protocol import APIError, GenerationRequest


def check_request(request: GenerationRequest, model_name: str) -> SamplingParams:
    """Refuse an unknown model or an unsupported field; return the request's SamplingParams."""
    if request.model is not None and request.model != model_name:
        raise APIError(
            f"The model `{request.model}` does not exist. This server serves `{model_name}`.",
            status_code=404,
            type="NotFoundError",
            param="model",
            code="model_not_found",
        )
    if unsupported := request.unsupported():
        field, what = unsupported[0]
        raise APIError(f"{what} is not supported yet", param=field, code="unsupported_parameter")
    try:
        return request.to_sampling_params()
    except ValueError as error:
        # SamplingParams's messages start with the field's name ("top_k must be ...").
        field = str(error).split(" ", 1)[0]
        param = field if field in type(request).model_fields else None
        raise APIError(str(error), param=param) from error
