"""The request-parsing error that structured output and tools share, and the HTTP status of a
verifier's rejection."""

from __future__ import annotations


class RequestError(ValueError):
    """A bad request (the API answers it with an OpenAI-shaped 400)."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def rejection_status(code: str) -> int:
    """The HTTP status a verifier's Rejected code maps to: the request's own fault (400), the
    verifier failing on it (500, internal_error: its forward raised on this session alone), any
    other refusal of the fleet (502)."""
    if code.startswith("invalid") or code == "context_length_exceeded":
        return 400
    return 500 if code == "internal_error" else 502
