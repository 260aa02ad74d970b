"""A fake AsyncLLMEngine whose outputs can be worked out by hand (JetStream style), for server tests.

Tokenizer: one token per character, token id = Unicode code point (no BOS; EOS is id 0; surrogate
ids decode to U+FFFD). Chat template: "<role>content" per message, then "<assistant>".

Generation: choice i of a request emits the prompt's tokens reversed, each shifted by +i code points,
then EOS (finish "stop"); with ignore_eos the reversed prompt repeats. max_tokens (None: up to the
context) ends it with "length"; stop_token_ids and stop strings end it with "stop" and stop_reason,
held back while a stop string could still match (as the real engine does).
So prompt "abc" -> "cba", choice 1 -> "dcb"; chat [{"role":"user","content":"hi"}] -> ">tnatsissa<ih>resu<".
Logprobs: the sampled token has rank 1, logprob -0.5; rank r is token+r-1 with logprob -0.5*r.
Prompt logprobs: None, then -1.0 for each later prompt token.

KV "blocks": a request takes n * ceil((prompt + max_tokens) / block_size) blocks when admitted and gives
them back when it finishes or is aborted, so tests read leaks from kv_cache_usage (/metrics).
Admission: at most max_num_seqs running and blocks permitting; others wait (num_waiting).
Magic prompts: containing "[[fail]]" raises RuntimeError at once; "[[fail-mid]]" after 2 tokens.
"""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from jaxserve.engine_protocol import EngineStats, TokenHistogram
from jaxserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jaxserve.sampling_params import SamplingParams
from jaxserve.tokenizer import find_stop_string, stop_string_holdback

EOS = 0
VOCAB = 0x110000


class MockTokenizer:
    eos_token_id = EOS
    stop_token_ids = (EOS,)
    vocab_size = VOCAB
    chat_template = "mock"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self._chr(i) for i in ids if not (skip_special_tokens and i == EOS))

    @staticmethod
    def _chr(i: int) -> str:
        if not 0 <= i < VOCAB:
            raise ValueError(f"token id {i} out of range")
        return "\ufffd" if 0xD800 <= i <= 0xDFFF else chr(i)

    def apply_chat_template(self, messages: list[dict], chat_template: str | None = None,
                            add_generation_prompt: bool = True, **kw: Any) -> str:
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


@dataclass
class MockModelConfig:
    model: str = "/models/mock"
    served_model_name: str = "mock-model"
    max_model_len: int = 256
    chat_template: str | None = None
    max_logprobs: int = 20


class MockEngine:
    def __init__(self, served_model_name: str = "mock-model", max_model_len: int = 256, num_blocks: int = 1024,
                 block_size: int = 16, max_num_seqs: int = 64, token_delay: float = 0.0,
                 skip_tokenizer: bool = False) -> None:
        self.model_config = MockModelConfig(served_model_name=served_model_name, max_model_len=max_model_len)
        self.tokenizer = None if skip_tokenizer else MockTokenizer()
        self.generation_defaults: dict = {}
        self.num_blocks, self.block_size, self.max_num_seqs = num_blocks, block_size, max_num_seqs
        self.token_delay = token_delay
        self.errored, self.dead_error = False, None
        self.started = False
        self.shutdown_called: float | None = None
        self.params: dict[str, SamplingParams] = {}  # every request seen
        self.aborted: list[str] = []
        self.profile_calls: list[str] = []
        self.live: dict[str, int] = {}  # running request id -> blocks held
        self.num_waiting = 0
        self.listeners: list[Callable[[RequestOutput], None]] = []
        self.prompt_tokens = self.gen_tokens = self.queries = 0
        self.iters = TokenHistogram()

    @classmethod
    def from_engine_args(cls, args: Any) -> "MockEngine":
        return make(args)

    # -- interface --
    def start(self) -> None:
        self.started = True

    def add_listener(self, fn: Callable[[RequestOutput], None]) -> None:
        self.listeners.append(fn)

    @property
    def used_blocks(self) -> int:
        return sum(self.live.values())

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.live), num_waiting=self.num_waiting,
                           kv_cache_usage=self.used_blocks / self.num_blocks, prompt_tokens_total=self.prompt_tokens,
                           generation_tokens_total=self.gen_tokens, prefix_cache_queries_total=self.queries,
                           iteration_tokens=self.iters,
                           cache_config={"block_size": self.block_size, "num_gpu_blocks": self.num_blocks})

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self._free(request_id)

    def start_profile(self, dir: str) -> None:
        self.profile_calls.append(f"start:{dir}")

    def stop_profile(self) -> None:
        self.profile_calls.append("stop")

    async def shutdown(self, grace_s: float) -> None:
        self.shutdown_called = grace_s
        deadline = time.monotonic() + grace_s
        while self.live and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for rid in list(self.live):
            await self.abort(rid)

    # -- generation --
    def _free(self, rid: str) -> None:
        self.live.pop(rid, None)

    def _check(self, ids: list[int], p: SamplingParams) -> int:
        if not ids:
            raise ValueError("prompt is empty")
        if any(not 0 <= t < VOCAB for t in ids):
            raise ValueError(f"prompt has a token id outside the vocabulary [0, {VOCAB})")
        limit = self.model_config.max_model_len
        max_tokens = p.max_tokens if p.max_tokens is not None else limit - len(ids)
        if len(ids) + max_tokens > limit:
            raise ValueError(f"this model's maximum context length is {limit} tokens; the prompt has {len(ids)} "
                             f"tokens and max_tokens is {max_tokens} ({len(ids) + max_tokens} in all)")
        if max_tokens < 1:
            raise ValueError(f"the prompt ({len(ids)} tokens) leaves no room in the context of {limit}")
        if self._blocks(len(ids), max_tokens, p.n) > self.num_blocks:
            raise ValueError("request needs more KV blocks than exist")
        return max_tokens

    def _blocks(self, prompt_len: int, max_tokens: int, n: int) -> int:
        return n * math.ceil((prompt_len + max_tokens) / self.block_size)

    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        p = sampling_params
        text_prompt = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.params[request_id] = p
        max_tokens = self._check(ids, p)
        text_prompt = text_prompt if text_prompt is not None else MockTokenizer().decode(ids)
        if "[[fail]]" in text_prompt:
            raise RuntimeError("mock engine fault")
        need = self._blocks(len(ids), max_tokens, p.n)
        metrics = RequestMetrics(arrival_time=time.monotonic())
        self.num_waiting += 1
        try:  # polling keeps the fake free of loop-bound primitives (tests run servers on other threads)
            while len(self.live) >= self.max_num_seqs or self.used_blocks + need > self.num_blocks:
                await asyncio.sleep(0.002)
        finally:
            self.num_waiting -= 1
        self.live[request_id] = need
        metrics.first_scheduled_time = time.monotonic()
        self.prompt_tokens += len(ids)
        self.queries += len(ids)
        outs = [_Choice(i, ids, p, self.tokenizer) for i in range(p.n)]
        out = RequestOutput(request_id, prompt if isinstance(prompt, str) else None, ids, _prompt_logprobs(ids, p),
                            [c.out for c in outs], False, metrics)
        try:
            for step in range(max_tokens):
                if request_id not in self.live:  # aborted
                    for c in outs:
                        c.out.finish_reason = c.out.finish_reason or "abort"
                    break
                if step == 2 and "[[fail-mid]]" in text_prompt:
                    raise RuntimeError("mock engine fault mid-stream")
                active = [c for c in outs if not c.out.finished()]
                for c in active:
                    c.step(step, last=step == max_tokens - 1)
                self.gen_tokens += len(active)
                self.iters.observe(len(active))
                now = time.monotonic()
                metrics.first_token_time = metrics.first_token_time or now
                metrics.last_token_time = now
                out.finished = all(c.out.finished() for c in outs)
                yield out
                if out.finished:
                    break
                await asyncio.sleep(self.token_delay)
        finally:
            self._free(request_id)
            out.finished = True
            metrics.finished_time = time.monotonic()
            for c in outs:
                c.out.finish_reason = c.out.finish_reason or "abort"
            for fn in self.listeners:
                fn(out)


def _prompt_logprobs(ids: list[int], p: SamplingParams) -> list | None:
    if p.prompt_logprobs is None:
        return None
    return [None] + [{t: Logprob(-1.0, 1, MockTokenizer._chr(t))} for t in ids[1:]]


class _Choice:
    """One sample: reversed prompt shifted by +index, then EOS."""

    def __init__(self, index: int, ids: list[int], p: SamplingParams, tok: MockTokenizer | None) -> None:
        self.p, self.tok = p, tok or MockTokenizer()
        self.seq = [(t + index) % VOCAB for t in reversed(ids)]
        self.full_text = ""
        self.out = CompletionOutput(index, "", [], 0.0 if p.logprobs is not None else None,
                                    [] if p.logprobs is not None else None)

    def step(self, k: int, last: bool) -> None:
        p, o = self.p, self.out
        if k < len(self.seq) or p.ignore_eos:
            t = self.seq[k % len(self.seq)]
        else:
            t = EOS
        o.token_ids.append(t)
        if p.logprobs is not None:
            top = {(t + r - 1) % VOCAB: Logprob(-0.5 * r, r, self.tok._chr((t + r - 1) % VOCAB))
                   for r in range(1, p.logprobs + 1)}
            top[t] = Logprob(-0.5, 1, self.tok._chr(t))
            o.logprobs.append(top)
            o.cumulative_logprob += -0.5
        if t == EOS and not p.ignore_eos:
            o.finish_reason = "stop"
        elif t in p.stop_token_ids:
            o.finish_reason, o.stop_reason = "stop", t
        else:
            self.full_text += self.tok.decode([t])
        cut, hit = find_stop_string(self.full_text, p.stop, p.include_stop_str_in_output)
        if hit is not None:
            o.text, o.finish_reason, o.stop_reason = cut, "stop", hit
            return
        if o.finish_reason is None and last:
            o.finish_reason = "length"
        hold = 0 if o.finish_reason else stop_string_holdback(self.full_text, p.stop)
        o.text = self.full_text[:len(self.full_text) - hold]


def make(args: Any = None, **kw: Any) -> MockEngine:
    """--engine-factory mock_engine:make (EngineArgs -> MockEngine)."""
    if args is not None:
        kw.setdefault("served_model_name", args.served_model_name or "mock-model")
        kw.setdefault("max_model_len", args.max_model_len or 256)
        kw.setdefault("max_num_seqs", args.max_num_seqs or 256)
        kw.setdefault("num_blocks", args.num_gpu_blocks_override or 1024)
        kw.setdefault("block_size", args.block_size)
        kw.setdefault("skip_tokenizer", args.skip_tokenizer_init)
    return MockEngine(**kw)


def make_slow(args: Any = None) -> MockEngine:
    """Like make, with 50 ms per token (SIGTERM drain tests)."""
    return make(args, token_delay=0.05)
