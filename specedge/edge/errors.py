"""The request-parsing error that structured output and tools share."""

from __future__ import annotations


class RequestError(ValueError):
    """A bad request (the API answers it with an OpenAI-shaped 400)."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code
