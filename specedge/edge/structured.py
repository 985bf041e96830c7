"""Structured output on the API: response_format and tools become one grammar per request
(specedge.execution.grammar), checked and compiled before any work, off the event loop."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

from schemas.wire import GrammarSpec
from specedge.edge import tools as tools_mod
from specedge.edge.errors import RequestError
from specedge.execution.grammar import Constraint, GrammarError, Grammars, check

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for schema and function names


@dataclass(frozen=True)
class Structure:
    grammar: GrammarSpec | None = None  # the constraint on the output, if any
    tools: tools_mod.ToolPlan | None = None  # tools rendered in the prompt, calls parsed out


def _response_format(rf: Any) -> GrammarSpec | None:
    p = "response_format"
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise RequestError("'response_format' must be an object with a 'type'", p)
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object")
    if kind != "json_schema":
        raise RequestError(f"response_format type {json.dumps(kind)}: text, json_object or "
                           "json_schema", f"{p}.type")
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise RequestError("'response_format.json_schema' must be an object",
                           f"{p}.json_schema")
    name = js.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise RequestError("'response_format.json_schema.name' must be 1-64 letters, digits, "
                           "underscores or dashes", f"{p}.json_schema.name")
    schema = js.get("schema", {})
    if not isinstance(schema, dict):
        raise RequestError("'response_format.json_schema.schema' must be an object",
                           f"{p}.json_schema.schema")
    if not isinstance(js.get("strict", False), bool | None):
        raise RequestError("'response_format.json_schema.strict' must be a boolean",
                           f"{p}.json_schema.strict")
    return GrammarSpec("json_schema", json.dumps(schema))


def parse(body: dict, chat: bool) -> Structure:
    """response_format (both endpoints) and tools (chat only); RequestError for bad ones."""
    for legacy in ("functions", "function_call"):
        if body.get(legacy) is not None:
            raise RequestError(f"'{legacy}' is deprecated and not supported; use 'tools'",
                               legacy)
    plan = tools_mod.parse(body) if chat else None
    if not chat and (body.get("tools") or body.get("tool_choice")):
        raise RequestError("'tools' are for /v1/chat/completions", "tools")
    rf = body.get("response_format")
    grammar = None if rf is None else _response_format(rf)
    if plan is not None and plan.grammar is not None:
        if grammar is not None:
            raise RequestError("'response_format' cannot be combined with a tool_choice that "
                               "forces a call", "response_format")
        grammar = plan.grammar
    try:
        if grammar is not None:
            check(grammar)
    except GrammarError as exc:
        raise RequestError(str(exc), "tools" if plan and plan.grammar else "response_format",
                           "invalid_schema") from None
    return Structure(grammar, plan)


async def prepare(grammars: Grammars, st: Structure | None, eos: tuple[int, ...]) -> None:
    """Compile the request's grammar (cached per spec) on a thread, within the time limit;
    other requests keep running meanwhile. RequestError if it cannot be used."""
    if st is None or st.grammar is None:
        return
    param = "tool_choice" if st.tools is not None and st.tools.grammar else "response_format"
    if not eos:
        raise RequestError("this model has no end-of-sequence token to end structured output "
                           "on", param)
    try:
        await asyncio.to_thread(grammars.compile, st.grammar, eos)
    except GrammarError as exc:
        raise RequestError(str(exc), param, "invalid_schema") from None


def constraint(grammars: Grammars, st: Structure | None,
               eos: tuple[int, ...]) -> Constraint | None:
    """A session's own matcher (the compile is cached by `prepare`)."""
    if st is None or st.grammar is None:
        return None
    return grammars.constraint(st.grammar, eos)
