"""LLMEngine: `step()` = schedule -> run -> update. The offline LLM and the async server engine wrap it.

One user request is a group of `n` sample records (`Request`): the parent is scheduled alone; when
its prompt completes, the runner draws n first tokens from its last logits and children fork off
sharing its KV blocks (copy-on-write). Detokenization, stop strings and logprob dicts are done here
on the host; stop ids and max_tokens end a sample the step its token is appended.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from jaxserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jaxserve.request import Request, RequestStatus
from jaxserve.sampling_params import RequestOutputKind, SamplingParams
from jaxserve.tokenizer import find_stop_string, stop_string_holdback

log = logging.getLogger("jaxserve")


@dataclass
class _Sample:
    req: Request
    seed: int
    detok: object = None  # IncrementalDetokenizer
    text: str = ""  # text after stop-string handling
    logprobs: list | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _Step:
    """A dispatched step whose sampled tokens may still be on the device."""
    out: object  # SchedulerOutput
    batch: object  # InputBatch
    sampled: object  # (sampler.SamplerOutput of device arrays or None, all logits or None), or a Future of it
    prompt_logprobs: dict


@dataclass
class _Group:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_Sample]
    arrival_time: float
    prompt_logprobs: list | None = None
    finished_sent: bool = False
    metrics: RequestMetrics = field(default=None)
    base_seed: int = 0  # sample i draws with seed base_seed + i


class LLMEngine:
    def __init__(self, *, config, arch, tokenizer, runner, scheduler, generation_defaults: dict):
        self.config = config
        self.model_config = config.model
        self.arch = arch
        self.tokenizer = tokenizer
        self.runner = runner
        self.scheduler = scheduler
        self.block_manager = scheduler.block_manager
        self.generation_defaults = generation_defaults
        self.groups: dict[str, _Group] = {}
        self._rng = np.random.default_rng(config.model.seed)
        self.phases = PhaseTimes()  # host seconds per step phase (one thread: the engine's; not re-entrant)
        self.stats_counters = dict(prompt_tokens_total=0, generation_tokens_total=0, num_steps=0,
                                   last_step_tokens=0)
        self.finished_listeners: list = []
        self._inflight: _Step | None = None
        # Device launches from their own thread (config.dispatch_thread): XLA enqueues a step's kernels on
        # the calling thread with the GIL released, so that time overlaps the engine's Python work.
        self._dispatcher = (ThreadPoolExecutor(1, thread_name_prefix="jaxserve-dispatch")
                            if config.dispatch_thread and runner.device_inputs else None)
        self._token_text: dict[int, str] = {}
        self.stream_outputs = True  # False: step() returns finished requests only (the offline LLM)

    @classmethod
    def from_engine_args(cls, args) -> LLMEngine:
        from jaxserve.engine_builder import build_engine
        return build_engine(cls, args)

    # ------------------------------------------------------------------------------------- requests
    def default_sampling_params(self) -> SamplingParams:
        return SamplingParams(**{k: v for k, v in self.generation_defaults.items()
                                 if k in SamplingParams.__dataclass_fields__})

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine was started with skip_tokenizer_init: give prompt_token_ids, not text")
            return prompt, self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not all(isinstance(t, (int, np.integer)) for t in ids):
            raise ValueError("a prompt must be a string or a list of token ids")
        return None, [int(t) for t in ids]

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Queue a request. ValueError (the server's 400) for anything that could never be served."""
        params = params or self.default_sampling_params()
        text, ids = self._tokenize(prompt)
        max_len = self.model_config.max_model_len
        vocab = self.arch.vocab_size
        if not ids:
            raise ValueError("the prompt is empty")
        if any(t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if params.logit_bias and any(not 0 <= t < vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
        if len(ids) >= max_len:
            raise ValueError(f"the prompt has {len(ids)} tokens but the model's context length (max_model_len) is "
                             f"{max_len}: at most {max_len - 1} prompt tokens leave room for one output token")
        if params.max_tokens is not None and len(ids) + params.max_tokens > max_len:
            raise ValueError(f"this model's context length is {max_len} tokens, but {len(ids)} prompt tokens + "
                             f"max_tokens {params.max_tokens} = {len(ids) + params.max_tokens}; lower max_tokens "
                             f"or shorten the prompt")
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        stop_ids = set(params.stop_token_ids or [])
        if not params.ignore_eos:
            stop_ids |= set(self._eos_ids())
        params.all_stop_token_ids = stop_ids
        base_seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**31))
        now = arrival_time or time.monotonic()
        req = Request(request_id, ids, params, arrival_time=now)
        self.scheduler.add(req)  # may raise: can never fit the KV cache
        g = _Group(request_id, text, ids, params, [], now, metrics=RequestMetrics(arrival_time=now),
                   base_seed=base_seed)
        g.samples = [self._new_sample(req, base_seed)] + [None] * (params.n - 1)
        if params.prompt_logprobs is not None:
            g.prompt_logprobs = [None]
        self.groups[request_id] = g
        self.stats_counters["prompt_tokens_total"] += len(ids)

    def _eos_ids(self) -> list[int]:
        if self.tokenizer is not None:
            return list(self.tokenizer.stop_token_ids)
        return list(self.arch.eos_token_ids)

    def _new_sample(self, req: Request, seed: int) -> _Sample:
        s = _Sample(req, seed, logprobs=[] if req.sampling_params.logprobs is not None else None)
        if self.tokenizer is not None and req.sampling_params.detokenize:
            s.detok = self.tokenizer.incremental_detokenizer(req.prompt_token_ids,
                                                             req.sampling_params.skip_special_tokens)
        return s

    def abort_request(self, request_id: str) -> RequestOutput | None:
        g = self.groups.pop(request_id, None)
        if g is None:
            return None
        # Every sample, not just the parent: forked children outlive a parent that already finished.
        for s in g.samples:
            if s is not None:
                s.req.drop_placeholder()
                self.scheduler.finish(s.req, RequestStatus.FINISHED_ABORTED)
        for s in g.samples:
            if s is not None and s.finish_reason is None:
                s.finish_reason = "abort"
        return self._output(g)

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    # ----------------------------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """One iteration. With async scheduling (the default) the step pipelines: it schedules and
        dispatches step k, then (while the device runs k) fetches and processes step k-1's tokens. A
        request whose next input token is still on the device carries a placeholder (-1) that the
        runner fills from step k-1's sampled ids on the device; requests with penalties or prompt
        logprobs need their tokens on the host first, so while any exists the engine runs in lock-step."""
        if not self.config.async_scheduling or self._needs_sync:
            outputs = self._process(self._inflight) if self._inflight else []
            self._inflight = None
            step = self._dispatch()
            if step is not None:
                outputs += self._process(step)
            return outputs
        step = self._dispatch()
        outputs = self._process(self._inflight) if self._inflight else []
        self._inflight = step
        if step is not None:
            for i, row in enumerate(step.batch.rows):
                req = row.request
                sp = req.sampling_params
                if row.sample_index != req.sample_index or req.is_finished:
                    continue  # an n > 1 parent's extra rows: children fork with real tokens
                if (sp.max_tokens is not None and req.num_output_tokens + 1 >= sp.max_tokens) or \
                        req.num_tokens + 1 >= self.model_config.max_model_len:
                    continue  # its last token: nothing to schedule after it, so no placeholder
                req.append_placeholder(i)
        return outputs

    @property
    def _needs_sync(self) -> bool:
        if not self.runner.device_inputs:  # multi-host steps run in lock-step (docs/PARALLEL.md)
            return True
        return any(g.params.prompt_logprobs is not None or g.params.presence_penalty or g.params.frequency_penalty
                   or g.params.repetition_penalty != 1.0 for g in self.groups.values())

    def _dispatch(self) -> _Step | None:
        """Schedule and launch one step on the device (asynchronously).

        Host phases carry profiler annotations, so a trace (scripts/profile_decode.py, /start_profile)
        shows where the host's time per step goes beside the device ops."""
        with self.phases("schedule"):
            out = self.scheduler.schedule()
        if out.is_empty:
            return None
        runner = self.runner
        if not out.scheduled:
            self._launch(lambda prev: runner.run_block_ops(out))  # swaps of preempted requests only
            return None
        with self.phases("prepare"):
            batch = runner.prepare(out)
            fwd_in = runner.forward_inputs(batch)
            seeds = [self._group_of(r.request).base_seed + r.sample_index for r in batch.rows]
            smp_in = runner.sample_inputs(batch, seeds) if batch.rows else None
        self.stats_counters["last_step_tokens"] = batch.num_tokens
        self.stats_counters["num_steps"] += 1

        fused = runner.fuses_sampling(fwd_in, smp_in)

        def device_work(prev):
            # prev: the step in flight's sampled ids, which placeholders in this batch stand for (None when
            # that step sampled nothing, every row mid-prefill).
            runner.run_block_ops(out)
            if fused:  # tensor parallel: forward and sampling in one program
                with _annotate("jaxserve.dispatch_forward"):
                    return runner.launch_sampled(fwd_in, smp_in, prev.token_ids if prev is not None else None), None
            with _annotate("jaxserve.dispatch_forward"):
                logits, all_logits = runner.launch_forward(fwd_in, prev.token_ids if prev is not None else None)
            with _annotate("jaxserve.dispatch_sample"):
                sampled = runner.launch_sample(logits, smp_in) if smp_in is not None else None
            return sampled, all_logits

        launched = self._launch(device_work)
        plp = {}
        if batch.prompt_logprob_spans:  # lock-step only (_needs_sync): wait for this step's logits
            plp = runner.prompt_logprobs(_result(launched)[1], batch)
        self.scheduler.on_step_done(out)
        return _Step(out, batch, launched, plp)

    def wait_device(self) -> None:
        """Block until every launched step has run on the device (profiles, benchmarks). With the dispatch
        thread a launch may still be queued, and it replaces (donates) the KV cache arrays when it runs, so
        the queue is drained before the cache is waited on."""
        import jax
        if self._dispatcher is not None:
            self._dispatcher.submit(lambda: None).result()  # FIFO: every earlier launch has returned
        jax.block_until_ready(self.runner.kv_caches)

    def _launch(self, work):
        """Run work(previous step's SamplerOutput) now, or queue it on the dispatch thread (FIFO, so the
        previous step's launch has returned by the time this one runs). Returns a value or a Future."""
        prev = self._inflight.sampled if self._inflight is not None else None
        if self._dispatcher is None:
            return work(_result(prev)[0] if prev is not None else None)
        return self._dispatcher.submit(lambda: work(_result(prev)[0] if prev is not None else None))

    def _process(self, step: _Step) -> list[RequestOutput]:
        """Bring a step's sampled tokens to the host and apply them: detokenize, stop, fork, finish."""
        batch = step.batch
        sampled = _result(step.sampled)[0]
        if sampled is None:
            return []
        want_lp = any(r.request.sampling_params.logprobs is not None for r in batch.rows)
        with self.phases("wait_tokens"):
            host = _to_host(sampled, len(batch.rows), want_lp)
        for rid, res in step.prompt_logprobs.items():
            if rid in self.groups:
                self._add_prompt_logprobs(self.groups[rid], *res)
        touched: dict[str, _Group] = {}
        children: dict[str, list[Request]] = {}
        ended: list[tuple[Request, RequestStatus]] = []
        now = time.monotonic()  # one clock read per step: every row's token arrived with this transfer
        for i, row in enumerate(batch.rows):
            req = row.request
            g = self.groups.get(self._group_id(req))
            if g is None or req.is_finished:
                continue
            touched[g.request_id] = g
            if req.parent is None and req.sampling_params.n > 1 and row.sample_index > 0:
                req = self._fork(g, req, row.sample_index)
                children.setdefault(g.request_id, []).append(req)
            status = self._append(g, req, host, i, now)
            if status is not None:
                ended.append((req, status))
        # Children join before anyone finishes: a parent done at its first token still lends its blocks.
        done = {id(r) for r, _ in ended}
        for gid, kids in children.items():
            self.scheduler.fork_children(self.groups[gid].samples[0].req, [c for c in kids if id(c) not in done])
        for req, status in ended:
            self.scheduler.finish(req, status)
            req.status = status
        # Offline generation and non-streaming requests want finished outputs only: skip building the
        # others' (O(tokens) each, every step).
        outputs = [self._output(g) for g in touched.values()
                   if (self.stream_outputs and g.params.output_kind is RequestOutputKind.CUMULATIVE)
                   or self._finished(g)]
        for o in outputs:
            if o.finished:
                g = self.groups[o.request_id]
                self.groups.pop(g.request_id, None)
                g.metrics.finished_time = time.monotonic()
                for fn in self.finished_listeners:
                    fn(g, o)
        return outputs

    @staticmethod
    def _group_id(req: Request) -> str:
        return req.parent.request_id if req.parent is not None else req.request_id

    def _group_of(self, req: Request) -> _Group:
        return self.groups[self._group_id(req)]

    def _fork(self, g: _Group, parent: Request, index: int) -> Request:
        child = Request(f"{parent.request_id}#{index}", parent.prompt_token_ids, parent.sampling_params,
                        arrival_time=parent.arrival_time, sample_index=index, parent=parent)
        g.samples[index] = self._new_sample(child, g.base_seed + index)
        return child  # joins the scheduler (fork_children) once all n first tokens are appended

    def _append(self, g: _Group, req: Request, host, i: int, now: float) -> RequestStatus | None:
        """Append row i's sampled token to req; returns the status that ends it, if any."""
        s = g.samples[req.sample_index]
        tok = host["ids"][i]
        sp = req.sampling_params
        req.append_token(tok)  # fills the placeholder if the step was dispatched ahead of this token
        req.first_token_time = req.first_token_time or now
        req.last_token_time = now
        if g.metrics.first_token_time is None:
            g.metrics.first_token_time = now
            g.metrics.first_scheduled_time = req.first_scheduled_time
            g.metrics.num_cached_tokens = req.num_cached_tokens
        g.metrics.last_token_time = now
        self.stats_counters["generation_tokens_total"] += 1
        if s.logprobs is not None or "lp" in host:
            lp = float(host["lp"][i])
            s.cumulative_logprob += lp
            if s.logprobs is not None:
                s.logprobs.append(self._logprob_dict(tok, lp, int(host["rank"][i]), host["top_ids"][i],
                                                     host["top_lp"][i], sp.logprobs))
        status = None
        if req.num_output_tokens >= sp.min_tokens and tok in sp.all_stop_token_ids:
            status = RequestStatus.FINISHED_STOPPED
            s.stop_reason = tok if tok in sp.stop_token_ids else None  # eos: None, as vLLM
        if s.detok is not None and (status is None or sp.include_stop_str_in_output):
            before = len(s.detok.text)
            s.detok.add(tok)
            s.text = s.detok.text
            if status is None and sp.stop:
                cut, stop = find_stop_string(s.text, sp.stop, sp.include_stop_str_in_output, before)
                if stop is not None:
                    status, s.stop_reason, s.text = RequestStatus.FINISHED_STOPPED, stop, cut
        if status is None and sp.max_tokens is not None and req.num_output_tokens >= sp.max_tokens:
            status = RequestStatus.FINISHED_LENGTH
        if status is None and req.num_tokens >= self.model_config.max_model_len:
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            s.finish_reason = status.value
        return status

    def _logprob_dict(self, tok, lp, rank, top_ids, top_lp, n) -> dict[int, Logprob]:
        d = {tok: Logprob(lp, rank, self._decode_token(tok))}
        for j in range(n or 0):
            t = int(top_ids[j])
            if t not in d:
                d[t] = Logprob(float(top_lp[j]), j + 1, self._decode_token(t))
        return d

    def _decode_token(self, tok: int) -> str | None:
        if self.tokenizer is None:
            return None
        text = self._token_text.get(tok)
        if text is None:  # top-N logprobs ask for the same few thousand tokens over and over
            text = self._token_text[tok] = self.tokenizer.decode([tok], skip_special_tokens=False)
        return text

    def _add_prompt_logprobs(self, g: _Group, first_pos, tok_lp, rank, top_ids, top_lp) -> None:
        n = g.params.prompt_logprobs
        for j in range(len(tok_lp)):
            pos = first_pos + j
            d = self._logprob_dict(g.prompt_token_ids[pos], float(tok_lp[j]), int(rank[j]), top_ids[j], top_lp[j], n)
            if pos < len(g.prompt_logprobs):  # recomputed after a preemption: replace, never append twice
                g.prompt_logprobs[pos] = d
            else:
                g.prompt_logprobs.append(d)

    @staticmethod
    def _finished(g: _Group) -> bool:
        return all(s is not None and s.finish_reason for s in g.samples)

    def _output(self, g: _Group) -> RequestOutput:
        outs = []
        for i, s in enumerate(g.samples):
            if s is None:
                continue
            text = s.text
            if s.finish_reason is None and g.params.stop:  # never show a partial stop string
                text = text[:len(text) - stop_string_holdback(text, g.params.stop)]
            outs.append(CompletionOutput(i, text, list(s.req.output_token_ids),
                                         s.cumulative_logprob if s.logprobs is not None else None,
                                         s.logprobs, s.finish_reason, s.stop_reason))
        finished = len(outs) == g.params.n and all(o.finish_reason for o in outs)
        return RequestOutput(g.request_id, g.prompt, g.prompt_token_ids, g.prompt_logprobs, outs, finished,
                             g.metrics, g.metrics.num_cached_tokens)

    # ---------------------------------------------------------------------------------------- stats
    def stats(self) -> dict:
        bm, sch = self.block_manager, self.scheduler
        return dict(num_running=sch.num_running, num_waiting=sch.num_waiting, num_swapped=sch.num_swapped,
                    kv_cache_usage=bm.usage, num_preemptions_total=sch.num_preemptions_total,
                    prefix_cache_queries_total=bm.prefix_cache_queries,
                    prefix_cache_hits_total=bm.prefix_cache_hits, **self.stats_counters)


def _annotate(name: str):
    import jax
    return jax.profiler.TraceAnnotation(name)


class PhaseTimes:
    """The engine thread's host time per phase of a step, each phase also a profiler annotation
    ("jaxserve.<phase>"): `with phases("schedule"): ...`; `seconds` holds the cumulative totals (the engine
    process's busy-period log line reads them)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._name = ""
        self._t0 = 0.0
        self._ann = None

    def __call__(self, name: str) -> PhaseTimes:
        self._name = name
        return self

    def __enter__(self) -> None:
        self._ann = _annotate("jaxserve." + self._name)
        self._ann.__enter__()
        self._t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        dt = time.perf_counter() - self._t0
        self._ann.__exit__(*exc)
        self.seconds[self._name] = self.seconds.get(self._name, 0.0) + dt

    def add(self, name: str, dt: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + dt


def _result(x):
    return x.result() if isinstance(x, Future) else x


def _to_host(so, n: int, want_logprobs: bool) -> dict:
    """The one device->host transfer of a step: sampled ids (and logprobs when a row asked for them)."""
    d = {"ids": np.asarray(so.token_ids)[:n].tolist()}  # Python ints: the hot loop reads one per row
    if want_logprobs:
        d["lp"] = np.asarray(so.logprob)[:n]
        d["rank"] = np.asarray(so.ranks)[:n]
        d["top_ids"] = np.asarray(so.top_ids)[:n]
        d["top_lp"] = np.asarray(so.top_logprobs)[:n]
    return d
