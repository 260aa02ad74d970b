"""/v1/chat/completions: messages -> chat template -> token ids -> engine -> `chat.completion` JSON or
`chat.completion.chunk` SSE events.

The template is rendered and tokenized here, in a worker thread (jinja and tokenization are CPU work
that must not stall the event loop), with add_special_tokens=False: the template already carries BOS
where the model wants it (vLLM does the same). A stream sends each choice's role chunk once the engine
has accepted the request (so a prompt over the context is still a plain 400), then content deltas.
"""
from __future__ import annotations

import os
import time
from typing import Any, AsyncIterator

import anyio

from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import RequestOutputKind
from jaxserve.server.common import ChunkEncoder, DeltaTracker, choices_of, usage
from jaxserve.server.errors import bad_request
from jaxserve.server.logprobs import chat_logprobs
from jaxserve.server.protocol import ChatCompletionRequest, ChatMessage, chat_messages
from jaxserve.server.streaming import merge_outputs


def resolve_chat_template(template: str | None) -> str | None:
    """--chat-template may be a file path or the template itself."""
    if template and len(template) < 4096 and os.path.isfile(template):
        with open(template, encoding="utf-8") as f:
            return f.read()
    return template


async def render_chat(state: Any, messages: list[ChatMessage], add_generation_prompt: bool) -> list[int]:
    tok = state.engine.tokenizer
    if tok is None:
        raise bad_request("chat needs a tokenizer, and this server runs with --skip-tokenizer-init", "messages")
    msgs = chat_messages(messages)

    def work() -> list[int]:
        text = tok.apply_chat_template(msgs, chat_template=state.chat_template,
                                       add_generation_prompt=add_generation_prompt)
        return tok.encode(text, add_special_tokens=False)

    try:
        return await anyio.to_thread.run_sync(work)
    except ValueError as e:
        raise bad_request(str(e), "messages") from None
    except Exception as e:  # a template that fails to render on these messages (jinja errors)
        raise bad_request(f"chat template failed on these messages: {e}", "messages") from None


async def chat_events(state: Any, req: ChatCompletionRequest, params: Any,
                      request_id: str) -> AsyncIterator[dict]:
    prompt_ids = await render_chat(state, req.messages, req.add_generation_prompt)
    if not req.stream:  # the engine builds this request's output once, when it finishes
        params.output_kind = RequestOutputKind.FINAL_ONLY
    gen = _stream if req.stream else _full
    return gen(state, req, params, request_id, prompt_ids)


def _logprobs(state: Any, req: ChatCompletionRequest, ids: list[int], positions: list) -> dict | None:
    if not req.logprobs:
        return None
    return chat_logprobs(ids, positions, req.top_logprobs or 0, state.engine.tokenizer)


async def _full(state: Any, req: ChatCompletionRequest, params: Any, request_id: str,
                prompt_ids: list[int]) -> AsyncIterator[dict]:
    created = int(time.time())
    last: dict[int, RequestOutput] = {}
    async for i, out in merge_outputs(state.engine, [prompt_ids], params, request_id):
        last[i] = out
    choices = [{"index": idx, "message": {"role": "assistant", "content": c.text},
                "logprobs": _logprobs(state, req, list(c.token_ids), list(c.logprobs or [])),
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
               for idx, _, _, c in choices_of(last, req.n)]
    yield {"id": request_id, "object": "chat.completion", "created": created, "model": state.model_name,
           "choices": choices, "usage": usage(last)}


async def _stream(state: Any, req: ChatCompletionRequest, params: Any, request_id: str,
                  prompt_ids: list[int]) -> AsyncIterator[str]:
    chunk = ChunkEncoder({"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
                          "model": state.model_name})
    tracker = DeltaTracker(req.n)
    opts = req.stream_options
    role_sent = False
    async for i, out in merge_outputs(state.engine, [prompt_ids], params, request_id):
        if not role_sent:
            role_sent = True
            for idx in range(req.n):
                yield chunk([{"index": idx, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
        for d in tracker.update(i, out):
            if not d.text and not d.token_ids and d.finish_reason is None:
                continue
            choice = {"index": d.index, "delta": {"content": d.text} if d.text else {},
                      "logprobs": _logprobs(state, req, d.token_ids, d.logprobs),
                      "finish_reason": d.finish_reason}
            if d.finish_reason is not None:
                choice["stop_reason"] = d.stop_reason
            if opts is not None and opts.include_usage and opts.continuous_usage_stats:
                yield chunk([choice], usage=usage(tracker.last))
            else:
                yield chunk([choice])
    if opts is not None and opts.include_usage:
        yield chunk([], usage=usage(tracker.last))
