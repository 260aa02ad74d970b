"""Offline batch generation with vLLM's API: `LLM(model=..., **engine flags).generate(prompts, params)`.

Results come back in input order, one RequestOutput per prompt with `.outputs[j]` per sample, so
code written for vLLM runs unchanged. With no model, the embedded SmolLM2-135M-Instruct is used.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

from tqdm import tqdm

from jaxserve.config import EngineArgs
from jaxserve.engine import LLMEngine
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str | None = None, **engine_flags):
        fields = EngineArgs.__dataclass_fields__
        unknown = set(engine_flags) - set(fields)
        if unknown:
            raise TypeError(f"unknown engine arguments: {sorted(unknown)}")
        self.engine_args = EngineArgs(model=model, **engine_flags)
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)
        self.llm_engine.stream_outputs = False  # generate() returns whole results, no per-token outputs
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self.llm_engine.default_sampling_params()

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """prompts: a string, a list of strings, {"prompt_token_ids": [...]} dicts, or lists of token ids."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        elif prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        return self._run(prompts, params, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | None = None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"}) or a list of conversations."""
        tok = self.llm_engine.tokenizer
        if tok is None:
            raise ValueError("chat() needs a tokenizer (the engine was started with skip_tokenizer_init)")
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        texts = [tok.apply_chat_template(c, chat_template=chat_template, add_generation_prompt=add_generation_prompt)
                 for c in convs]
        # The template already holds the special tokens (bos): encode without adding them again.
        prompts = [{"prompt": t, "prompt_token_ids": tok.encode(t, add_special_tokens=False)} for t in texts]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, prompts: list, params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        order = {}
        results: list[RequestOutput | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc="generating", unit="req", disable=not use_tqdm)
        try:
            # Inside the try: a bad prompt (ValueError) must not leave the ones before it queued.
            for prompt, sp in zip(prompts, params):
                rid = f"offline-{next(self._ids)}"
                order[rid] = len(order)
                engine.add_request(rid, prompt, _copy(sp))
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        results[order[out.request_id]] = out
                        bar.update(1)
        except BaseException:
            for rid in order:
                engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return results


def _copy(sp: SamplingParams) -> SamplingParams:
    import copy
    return copy.copy(sp)
