"""/v1/completions: prompts -> engine requests -> OpenAI `text_completion` JSON or SSE chunks.

A prompt may be str | list[str] | list[int] | list[list[int]]; a batch becomes one engine request per
prompt, and choice i * n + j is sample j of prompt i (vLLM's numbering). `echo` prepends the prompt
text (and, with logprobs, the prompt positions' logprobs, asked of the engine as prompt_logprobs).
"""
from __future__ import annotations

import time
from typing import Any, AsyncIterator

from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import RequestOutputKind
from jaxserve.server.common import ChunkEncoder, DeltaTracker, choices_of, usage
from jaxserve.server.errors import bad_request
from jaxserve.server.logprobs import CompletionLogprobs
from jaxserve.server.protocol import CompletionRequest
from jaxserve.server.streaming import merge_outputs


def normalize_prompts(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    if isinstance(prompt[0], list) and any(len(p) == 0 for p in prompt):
        raise bad_request("prompt token lists must not be empty", "prompt")
    return list(prompt)


class _Echo:
    """Prompt text and prompt logprobs for `echo`."""

    def __init__(self, prompts: list[str | list[int]], tokenizer: Any) -> None:
        self.prompts, self.tokenizer = prompts, tokenizer

    def text(self, i: int, out: RequestOutput) -> str:
        if isinstance(self.prompts[i], str):
            return self.prompts[i]
        if out.prompt is not None:
            return out.prompt
        return self.tokenizer.decode(out.prompt_token_ids) if self.tokenizer is not None else ""

    @staticmethod
    def positions(out: RequestOutput) -> list:
        return list(out.prompt_logprobs) if out.prompt_logprobs is not None else [None] * len(out.prompt_token_ids)


def completion_events(state: Any, req: CompletionRequest, params: Any, request_id: str) -> AsyncIterator[dict]:
    prompts = normalize_prompts(req.prompt)
    if not req.stream:  # the engine builds this request's output once, when it finishes
        params.output_kind = RequestOutputKind.FINAL_ONLY
    gen = _stream if req.stream else _full
    return gen(state, req, params, request_id, prompts)


def _header(req: CompletionRequest, request_id: str, created: int, model: str) -> dict:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model}


async def _full(state: Any, req: CompletionRequest, params: Any, request_id: str,
                prompts: list) -> AsyncIterator[dict]:
    created = int(time.time())
    last: dict[int, RequestOutput] = {}
    async for i, out in merge_outputs(state.engine, prompts, params, request_id):
        last[i] = out
    choices = completion_choices(req, last, prompts, state.engine.tokenizer)
    yield {**_header(req, request_id, created, state.model_name), "choices": choices, "usage": usage(last)}


def completion_choices(req: CompletionRequest, last: dict[int, RequestOutput], prompts: list,
                       tokenizer: Any) -> list[dict]:
    """The `choices` of a finished (non-streaming) completion; the batch runner builds its bodies with it too."""
    echo = _Echo(prompts, tokenizer)
    choices = []
    for idx, i, out, c in choices_of(last, req.n):
        text, ids, positions = c.text, list(c.token_ids), list(c.logprobs or [])
        if req.echo:
            text = echo.text(i, out) + text
            ids = list(out.prompt_token_ids) + ids
            positions = echo.positions(out) + positions
        lp = None
        if req.logprobs is not None:
            lp = CompletionLogprobs(req.logprobs, tokenizer).format(ids, positions)
        choices.append({"index": idx, "text": text, "logprobs": lp, "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason})
    return choices


async def _stream(state: Any, req: CompletionRequest, params: Any, request_id: str,
                  prompts: list) -> AsyncIterator[str]:
    created = int(time.time())
    chunk = ChunkEncoder(_header(req, request_id, created, state.model_name))
    tracker = DeltaTracker(req.n)
    echo = _Echo(prompts, state.engine.tokenizer)
    lp_fmt: dict[int, CompletionLogprobs] = {}
    opts = req.stream_options
    async for i, out in merge_outputs(state.engine, prompts, params, request_id):
        for d in tracker.update(i, out):
            text, ids, positions = d.text, d.token_ids, d.logprobs
            if d.first and req.echo:
                text = echo.text(i, out) + text
                ids = list(out.prompt_token_ids) + ids
                positions = echo.positions(out) + positions
            lp = None
            if req.logprobs is not None:
                fmt = lp_fmt.setdefault(d.index, CompletionLogprobs(req.logprobs, state.engine.tokenizer))
                lp = fmt.format(ids, positions)
            choices = [{"index": d.index, "text": text, "logprobs": lp, "finish_reason": d.finish_reason,
                        "stop_reason": d.stop_reason}]
            if opts is not None and opts.include_usage and opts.continuous_usage_stats:
                yield chunk(choices, usage=usage(tracker.last))
            else:
                yield chunk(choices)
    if opts is not None and opts.include_usage:
        yield chunk([], usage=usage(tracker.last))
