"""The refusal of a model the packed execution cannot run exactly (support.py decides)."""

from __future__ import annotations


class UnsupportedModel(ValueError):
    """A model the packed execution cannot run exactly; the message is one line."""

    exit_code = 2


def model_name(config) -> str:
    path = getattr(config, "_name_or_path", "") or ""
    kind = getattr(config, "model_type", "?")
    return f"{path} ({kind})" if path else kind


def refuse(config, why: str) -> UnsupportedModel:
    text = " ".join(why.split())  # one line, whatever the cause's text holds
    return UnsupportedModel(f"model {model_name(config)} is not supported: {text}")
