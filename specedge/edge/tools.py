"""Tool calls on the chat endpoint: tools rendered through the model's chat template, the
output constrained to a valid call when tool_choice asks for one, and the output parsed
back into OpenAI's message.tool_calls.

The call format is the Hermes/Qwen2.5 one the templates teach:
<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>. A forced call is a grammar:
the literal tags around the JSON schema of {"name": <one of the functions>, "arguments":
<its parameters>}, built by xgrammar from that schema (one call, then the end)."""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from schemas.wire import GrammarSpec
from specedge.edge.errors import RequestError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(\{.*?\})\s*" + re.escape(CLOSE), re.DOTALL)
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 128


_error = RequestError  # (message, param)


@dataclass(frozen=True)
class ToolPlan:
    tools: tuple[dict, ...]  # OpenAI's {"type": "function", "function": {...}}, as given
    choice: str  # none | auto | required | function (a named one)
    name: str = ""  # the function tool_choice names
    grammar: GrammarSpec | None = None  # a forced call's constraint

    @property
    def rendered(self) -> list[dict] | None:
        """The tools the chat template renders (none with tool_choice none: no call)."""
        return None if self.choice == "none" else list(self.tools)


def _check_tool(i: int, t: Any) -> dict:
    p = f"tools[{i}]"
    if not isinstance(t, dict) or t.get("type") != "function":
        raise _error(f"{p}: each tool must be {{\"type\": \"function\", \"function\": {{...}}}}",
                     f"{p}.type")
    f = t.get("function")
    if not isinstance(f, dict):
        raise _error(f"{p}.function must be an object", f"{p}.function")
    if not isinstance(f.get("name"), str) or not _NAME.match(f["name"]):
        raise _error(f"{p}.function.name is required: 1-64 letters, digits, underscores or "
                     "dashes", f"{p}.function.name")
    if f.get("parameters") is not None and not isinstance(f["parameters"], dict):
        raise _error(f"{p}.function.parameters must be a JSON schema object",
                     f"{p}.function.parameters")
    if not isinstance(f.get("description", ""), str):
        raise _error(f"{p}.function.description must be a string", f"{p}.function.description")
    return t


def parse(body: dict) -> ToolPlan | None:
    raw, choice = body.get("tools"), body.get("tool_choice")
    if raw is None:
        if choice not in (None, "none", "auto"):
            raise _error("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(raw, list) or not raw or len(raw) > MAX_TOOLS:
        raise _error(f"'tools' must be a non-empty array of at most {MAX_TOOLS} tools", "tools")
    tools = tuple(_check_tool(i, t) for i, t in enumerate(raw))
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise _error("tool function names must be distinct", "tools")
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" \
            else None
        if not isinstance(name, str) or name not in names:
            raise _error("'tool_choice' names no function of 'tools'", "tool_choice")
        chosen = [t for t in tools if t["function"]["name"] == name]
        return ToolPlan(tools, "function", name, call_grammar(chosen))
    if choice not in ("none", "auto", "required"):
        raise _error("'tool_choice' must be none, auto, required or "
                     "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    return ToolPlan(tools, choice, "", call_grammar(list(tools)) if choice == "required"
                    else None)


def call_schema(tools: list[dict]) -> dict:
    """The JSON schema of one call of any of `tools`."""
    alts = [{"type": "object", "properties": {
        "name": {"const": t["function"]["name"]},
        "arguments": t["function"].get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return alts[0] if len(alts) == 1 else {"anyOf": alts}


def call_grammar(tools: list[dict]) -> GrammarSpec:
    """One call of any of `tools`, between the tags, as EBNF text (xgrammar's own rendering of
    the call's schema; the session's end follows the closing tag)."""
    import xgrammar as xgr

    try:
        call = xgr.Grammar.from_json_schema(json.dumps(call_schema(tools)), any_whitespace=False,
                                            strict_mode=True)
    except Exception as exc:
        raise RequestError(f"a tool's parameters are not a usable JSON schema: "
                           f"{str(exc).strip()[:300]}", "tools", "invalid_schema") from None
    g = xgr.Grammar.concat(xgr.Grammar.from_ebnf(f'root ::= "{OPEN}\\n"'), call,
                           xgr.Grammar.from_ebnf(f'root ::= "\\n{CLOSE}"'))
    return GrammarSpec("ebnf", str(g))


# ---------------------------------------------------------------- the prompt


def uses_tools(body: dict) -> bool:
    """Whether the chat prompt needs this module: tools, or tool turns in the messages."""
    msgs = body.get("messages")
    return bool(body.get("tools")) or isinstance(msgs, list) and any(
        isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in msgs)


def _content(i: int, m: dict, optional: bool) -> str | None:
    c = m.get("content")
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                   and isinstance(p.get("text"), str) for p in c):
        c = "".join(p["text"] for p in c)
    if c is None and optional:
        return None
    if not isinstance(c, str):
        raise _error(f"messages[{i}]: 'content' must be a string", f"messages[{i}].content")
    return c


def messages(body: dict) -> list[dict]:
    """OpenAI messages -> what chat templates read: tool results as role tool, an assistant's
    calls with their arguments as objects (the templates serialise them)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _error("'messages' must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise _error(f"messages[{i}]: 'role' must be system, developer, user, assistant or "
                         "tool", f"messages[{i}].role")
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise _error(f"messages[{i}]: a tool message needs 'tool_call_id'",
                             f"messages[{i}].tool_call_id")
            out.append({"role": "tool", "content": _content(i, m, False),
                        "tool_call_id": m["tool_call_id"]})
            continue
        calls = m.get("tool_calls") if role == "assistant" else None
        msg: dict = {"role": "system" if role == "developer" else role,
                     "content": _content(i, m, bool(calls))}
        if calls:
            msg["tool_calls"] = [_call_in(i, j, c) for j, c in enumerate(calls)]
        out.append(msg)
    return out


def _call_in(i: int, j: int, c: Any) -> dict:
    p = f"messages[{i}].tool_calls[{j}]"
    f = c.get("function") if isinstance(c, dict) else None
    if not isinstance(f, dict) or not isinstance(f.get("name"), str):
        raise _error(f"{p}: a call needs function.name", p)
    try:
        args = json.loads(f.get("arguments") or "{}")
    except (TypeError, ValueError):
        raise _error(f"{p}: function.arguments must be a JSON string", p) from None
    return {"id": c.get("id", ""), "type": "function",
            "function": {"name": f["name"], "arguments": args}}


def chat_prompt(body: dict, tok, plan: ToolPlan | None) -> list[int]:
    if not getattr(tok, "chat_template", None):
        raise _error("this model has no chat template; use /v1/completions", "messages")
    ids = tok.apply_chat_template(messages(body), tools=plan.rendered if plan else None,
                                  add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


# ---------------------------------------------------------------- the answer


def _as_call(obj: Any, names: set[str] | None) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or (
            names is not None and obj["name"] not in names):
        return None
    return {"id": "call_" + secrets.token_hex(12), "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(obj.get("arguments", {}))}}


def parse_calls(text: str, names: set[str] | None = None) -> tuple[str | None, list[dict]]:
    """(content before the first call or None, OpenAI tool_calls) from a model's output; a
    call that is not JSON with a string name stays in the content. Small models often drop
    the tags: an answer that is nothing but {"name": <a given tool>, "arguments": {...}} is a
    call too (`names`: the tools given)."""
    calls, first = [], None
    for m in _CALL.finditer(text):
        try:
            call = _as_call(json.loads(m.group(1)), None)
        except ValueError:
            continue
        if call is not None:
            first = m.start() if first is None else first
            calls.append(call)
    if not calls and names:
        try:
            bare = _as_call(json.loads(text), names)
        except ValueError:
            bare = None
        if bare is not None and isinstance(json.loads(text).get("arguments", {}), dict):
            return None, [bare]
    if not calls:
        return text, []
    content = text[:first].strip()
    return content or None, calls


def message(text: str, reason: str, plan: ToolPlan | None) -> tuple[dict, str]:
    """The assistant message and finish_reason of a finished choice."""
    if plan is None or plan.choice == "none":
        return {"role": "assistant", "content": text}, reason
    content, calls = parse_calls(text, {t["function"]["name"] for t in plan.tools})
    if not calls:
        return {"role": "assistant", "content": text}, reason
    return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"


def stream_deltas(text: str, reason: str, plan: ToolPlan | None) -> tuple[list[dict], str]:
    """A finished choice as stream deltas, the way OpenAI streams calls: the content (if any),
    then per call one delta with its id, type and name, and one with its arguments."""
    msg, reason = message(text, reason, plan)
    out: list[dict] = [{"content": msg["content"]}] if msg.get("content") else []
    for k, c in enumerate(msg.get("tool_calls", [])):
        out.append({"tool_calls": [{"index": k, "id": c["id"], "type": "function",
                                    "function": {"name": c["function"]["name"],
                                                 "arguments": ""}}]})
        out.append({"tool_calls": [{"index": k, "function": {
            "arguments": c["function"]["arguments"]}}]})
    return out, reason
