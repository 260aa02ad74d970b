"""The server's engine in its own process (the default): the front-end keeps HTTP, JSON and SSE; the engine
process keeps the scheduler and the device (vLLM's "frontend multiprocessing").

Why: in one process the event loop's per-chunk Python (JSON, SSE, uvicorn) and the engine thread take turns on
the GIL, and a thread that wants it back waits up to the switch interval (5 ms) each time. At a batch of a few
hundred streams that stretches every decode step. In two processes neither waits for the other.

Wire (two one-way pipes, pickled tuples):
- front-end -> engine: ("add", rid, prompt, params), ("abort", rid), ("profile", tag, dir or None),
  ("shutdown",).
- engine -> front-end: ("config", EngineConfig) early in start-up (the front-end loads its tokenizer meanwhile),
  ("ready", info) or ("startup_error", exc, traceback); then per step ("out", deltas, stats), ("err", rid, exc,
  stats) for a request the engine refused, ("aborted", delta, stats) for an abort's last output (it ends the
  stream; no listener sees it, as in-process), ("ack", tag, error or None), ("dead", exc, traceback).
- Outputs travel as deltas (`OutputEncoder` / `OutputDecoder`): new token ids, new text, new logprobs per
  sample, the prompt fields once. The front-end rebuilds the cumulative `RequestOutput`s the server reads, equal
  to what the engine built. Sending whole outputs would re-send every token of every stream each step.

Nothing here imports JAX: the front-end process never touches a device.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
import traceback

from jaxserve.async_engine import AsyncLLMEngine, cache_config, engine_stats
from jaxserve.engine_protocol import EngineStats, TokenHistogram
from jaxserve.outputs import CompletionOutput, Logprob, RequestOutput

log = logging.getLogger("jaxserve")


# ------------------------------------------------------------------------------------------------- the wire
class OutputEncoder:
    """Engine side: RequestOutput (cumulative) -> delta tuple, remembering what each request was sent.

    delta = (request_id, finished, samples, head); samples = [(index, new_token_ids, keep, text_tail,
    new_logprobs (as _lp_out tuples), cumulative_logprob, finish_reason, stop_reason)], where the text is
    old_text[:keep] + text_tail
    (keep = len(old_text) when the text only grew); head = None, or a dict of the fields that are sent when they
    change: prompt, prompt_token_ids and num_cached_tokens once, the new prompt logprobs (start, entries) when
    there are more (a preemption's recompute replaces entries in place: not re-sent), metrics on the first and the
    last output."""

    def __init__(self) -> None:
        self._sent: dict[str, dict] = {}

    def encode(self, out: RequestOutput) -> tuple:
        st = self._sent.get(out.request_id)
        head = None
        if st is None:
            st = self._sent[out.request_id] = dict(samples={}, plp=0)
            head = dict(prompt=out.prompt, prompt_token_ids=out.prompt_token_ids,
                        num_cached_tokens=out.num_cached_tokens, metrics=out.metrics)
        plp = out.prompt_logprobs
        if plp is not None and len(plp) > st["plp"]:
            head = head or {}
            head["prompt_logprobs_tail"] = (st["plp"], [_lp_out(d) for d in plp[st["plp"]:]])
            st["plp"] = len(plp)
        if out.finished:
            head = head or {}
            head["metrics"] = out.metrics
            self._sent.pop(out.request_id, None)
        samples = []
        for c in out.outputs:
            n_ids, text, n_lp = st["samples"].get(c.index, (0, "", 0))
            keep = len(text) if c.text.startswith(text) else 0
            lps = None if c.logprobs is None else [_lp_out(d) for d in c.logprobs[n_lp:]]
            samples.append((c.index, c.token_ids[n_ids:], keep, c.text[keep:], lps, c.cumulative_logprob,
                            c.finish_reason, c.stop_reason))
            st["samples"][c.index] = (len(c.token_ids), c.text, len(c.logprobs) if c.logprobs is not None else 0)
        return out.request_id, out.finished, samples, head


def _lp_out(d):
    """{token: Logprob} -> ((token, logprob, rank, decoded), ...) in order: tuples pickle ~5x faster than the
    dataclasses (512 streams x 21 logprobs: 2.5 against 12.6 ms a step, measured on CPU)."""
    return None if d is None else tuple((t, lp.logprob, lp.rank, lp.decoded_token) for t, lp in d.items())


def _lp_in(e):
    return None if e is None else {t: Logprob(v, r, dt) for t, v, r, dt in e}


class OutputDecoder:
    """Front-end side: delta tuples -> the cumulative RequestOutputs the engine built."""

    def __init__(self) -> None:
        self._reqs: dict[str, dict] = {}

    def decode(self, delta: tuple) -> RequestOutput:
        rid, finished, samples, head = delta
        r = self._reqs.get(rid)
        if r is None:
            r = self._reqs[rid] = dict(prompt=None, prompt_token_ids=[], prompt_logprobs=None, metrics=None,
                                       num_cached_tokens=0, samples={})
        if head:
            tail = head.pop("prompt_logprobs_tail", None)
            r.update(head)
            if tail is not None:
                start, entries = tail
                r["prompt_logprobs"] = (r["prompt_logprobs"] or [])[:start] + [_lp_in(e) for e in entries]
        outs = []
        for index, ids, keep, tail, lps, cum_lp, finish, stop in samples:
            s = r["samples"].get(index)
            if s is None:
                s = r["samples"][index] = dict(ids=[], text="", lps=None if lps is None else [])
            s["ids"].extend(ids)
            s["text"] = s["text"][:keep] + tail
            if lps is not None:
                if s["lps"] is None:
                    s["lps"] = []
                s["lps"].extend(_lp_in(e) for e in lps)
            outs.append(CompletionOutput(index, s["text"], list(s["ids"]), cum_lp, s["lps"] if lps is not None
                                         else None, finish, stop))
        if finished:
            self._reqs.pop(rid, None)
        return RequestOutput(rid, r["prompt"], r["prompt_token_ids"], r["prompt_logprobs"], outs, finished,
                             r["metrics"], r["num_cached_tokens"])


# ---------------------------------------------------------------------------------------- engine process
def _picklable(e: BaseException) -> BaseException:
    import pickle
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - an exception type that does not round-trip: keep its words
        return RuntimeError(f"{type(e).__name__}: {e}")


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when the front-end dies, also mid start-up (when nothing reads the pipe yet)
    and when it dies by SIGKILL or the OOM killer, which run no cleanup."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pipe's EOF ends the loop after start-up
        return
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(1)


def engine_process_main(args, cmd_r, out_w, log_level: int, parent_pid: int | None = None) -> None:
    """The engine process: build the engine, then step it and stream deltas until told to stop."""
    # Signals to the whole process group (Ctrl-C; a systemd stop; `timeout`) are the front-end's to handle: it
    # drains the requests in flight, then stops us over the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from jaxserve.engine import LLMEngine
        from jaxserve.engine_builder import build_engine
        engine = build_engine(LLMEngine, args, on_config=lambda cfg: out_w.send(("config", cfg)))
    except BaseException as e:  # noqa: BLE001 - the front-end re-raises it
        out_w.send(("startup_error", _picklable(e), traceback.format_exc()))
        return
    loop = _EngineLoop(engine, cmd_r, out_w)
    out_w.send(("ready", dict(generation_defaults=engine.generation_defaults,
                              startup_times=getattr(engine, "startup_times", {}), stats=loop.stats(),
                              cache_config=cache_config(engine))))
    loop.run()


class _EngineLoop:
    def __init__(self, engine, cmd_r, out_w) -> None:
        self.engine, self.cmd_r, self.out_w = engine, cmd_r, out_w
        self.encoder = OutputEncoder()
        self.hist = TokenHistogram()
        self.adds_seen = 0
        self.stop = False
        self.busy_since: float | None = None  # start of the current busy period (perf_counter)
        self.busy_steps = self.busy_tokens = 0
        self.busy_start: dict[str, float] = {}

    def _end_busy_period(self) -> None:
        """Log where the engine thread's time went over a busy period of 2 s or more (one INFO line): steps,
        output tokens, and host ms per step by phase. "step" is all of engine.step(), schedule, prepare and
        wait_tokens (the sampled ids' transfer, which waits for the device) are parts of it; "send" encodes and
        pipes the outputs, "commands" takes new requests and aborts."""
        if self.busy_since is None:
            return
        wall = time.perf_counter() - self.busy_since
        since, self.busy_since = self.busy_start, None
        if wall < 2.0 or not self.busy_steps:
            return
        n = self.busy_steps
        per = {k: (v - since.get(k, 0.0)) / n * 1e3 for k, v in self.engine.phases.seconds.items()}
        toks = self.engine.stats_counters["generation_tokens_total"] - self.busy_tokens
        order = ("step", "schedule", "prepare", "wait_tokens", "send", "commands")
        parts = ", ".join(f"{k} {per[k]:.2f}" for k in order if k in per)
        log.info("busy %.1f s: %d steps (%.2f ms each), %d output tokens (%.0f tok/s); host ms per step: %s",
                 wall, n, wall / n * 1e3, toks, toks / wall, parts)

    def stats(self) -> dict:
        return dict(self.engine.stats(), iteration_counts=list(self.hist.counts), iteration_total=self.hist.total,
                    adds_seen=self.adds_seen)

    def run(self) -> None:
        eng = self.engine
        clock, phases = time.perf_counter, eng.phases
        try:
            while not self.stop:
                # Idle: block until a command (or the front-end's end of the pipe closes). Busy: take what is there.
                busy = eng.has_unfinished_requests()
                if not busy:
                    self._end_busy_period()
                timeout = 0 if busy else None
                t0 = clock()
                while self.cmd_r.poll(timeout):
                    if timeout is None:
                        t0 = clock()  # the wait for the first command is idle time
                    self.handle(self.cmd_r.recv())
                    timeout = 0
                    if self.stop:
                        return
                if eng.has_unfinished_requests():
                    t1 = clock()
                    if self.busy_since is None:
                        self.busy_since, self.busy_steps = t1, 0
                        self.busy_start = dict(phases.seconds)
                        self.busy_tokens = eng.stats_counters["generation_tokens_total"]
                    outs = eng.step()
                    t2 = clock()
                    self.hist.observe(eng.stats_counters["last_step_tokens"])
                    self.out_w.send(("out", [self.encoder.encode(o) for o in outs], self.stats()))
                    phases.add("commands", t1 - t0)
                    phases.add("step", t2 - t1)
                    phases.add("send", clock() - t2)
                    self.busy_steps += 1
        except (EOFError, OSError, BrokenPipeError):
            return  # the front-end went away: nothing left to serve
        except BaseException as e:  # noqa: BLE001 - report the death, then exit
            log.exception("engine loop died")
            try:
                self.out_w.send(("dead", _picklable(e), traceback.format_exc()))
            except (OSError, BrokenPipeError):
                pass

    def handle(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            _, rid, prompt, params = cmd
            self.adds_seen += 1
            try:
                self.engine.add_request(rid, prompt, params)
            except Exception as e:  # noqa: BLE001 - one bad request must not kill the loop
                self.out_w.send(("err", rid, _picklable(e), self.stats()))
        elif kind == "abort":
            out = self.engine.abort_request(cmd[1])
            if out is not None:
                # The request's last output, also for an n > 1 request aborted before it forked (the engine
                # reports only the samples it has, so `finished` is not set): it ends the stream.
                out.finished = True
                self.out_w.send(("aborted", self.encoder.encode(out), self.stats()))
        elif kind == "profile":
            _, tag, folder = cmd
            err = None
            try:
                import jax
                if folder is not None:
                    jax.profiler.start_trace(folder)
                else:
                    self.engine.wait_device()
                    jax.profiler.stop_trace()
            except Exception as e:  # noqa: BLE001 - the route answers with it
                err = f"{type(e).__name__}: {e}"
            self.out_w.send(("ack", tag, err))
        elif kind == "shutdown":
            self.stop = True


# ------------------------------------------------------------------------------------------------ front-end
class MPAsyncLLMEngine(AsyncLLMEngine):
    """AsyncLLMEngineProtocol over an engine process. Streams, aborts and listeners behave as in the in-process
    AsyncLLMEngine (it shares its stream code); stats() is the engine's snapshot from its latest message."""

    def __init__(self, args, startup_timeout: float | None = None, while_starting=None) -> None:
        """Spawn the engine process and wait until it is ready. while_starting(), if given, runs in between (the
        server imports its own modules meanwhile)."""
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold threads or a device
        cmd_r, self._cmd_w = ctx.Pipe(duplex=False)
        self._out_r, out_w = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=engine_process_main, name="jaxserve-engine-core", daemon=True,
                                args=(args, cmd_r, out_w, logging.getLogger().getEffectiveLevel(), os.getpid()))
        self.proc.start()
        cmd_r.close()
        out_w.close()
        try:
            if while_starting is not None:
                while_starting()
            config, info, tokenizer = self._await_ready(startup_timeout)
        except BaseException:
            self._kill()
            raise
        self.engine = None
        self.config = config
        self.model_config = config.model
        self.tokenizer = tokenizer
        self.generation_defaults = info["generation_defaults"]
        self.startup_times = info["startup_times"]
        self._cache_config = info["cache_config"]
        self.errored = False
        self.dead_error: BaseException | None = None
        self._streams = {}
        self._listeners = []
        self._stop = False
        self._profiling = False
        self._stats: dict = info.get("stats", {})
        self._adds_sent = 0
        self._decoder = OutputDecoder()
        self._acks: dict[int, list] = {}
        self._ack_tag = 0
        self._ack_lock = threading.Lock()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="jaxserve-engine-send", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="jaxserve-engine-recv", daemon=True)
        self._sender.start()
        self._reader.start()

    @classmethod
    def from_engine_args(cls, args, while_starting=None) -> MPAsyncLLMEngine:
        return cls(args, while_starting=while_starting)

    def _await_ready(self, timeout: float | None):
        """Wait for the engine process's "ready"; its start-up error is raised here, as it would be in-process."""
        deadline = None if timeout is None else time.monotonic() + timeout
        config, tok_thread, tok_box = None, None, {}
        while True:
            if not self._out_r.poll(0.5):
                if not self.proc.is_alive():
                    raise RuntimeError(f"the engine process exited during start-up (exit code {self.proc.exitcode})")
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"the engine process was not ready within {timeout} s")
                continue
            try:
                msg = self._out_r.recv()
            except EOFError:
                self.proc.join(5)
                raise RuntimeError(f"the engine process exited during start-up (exit code {self.proc.exitcode})")
            if msg[0] == "config":
                config = msg[1]

                def load(mc=config.model):
                    from jaxserve.tokenizer import tokenizer_for
                    try:
                        tok_box["tok"] = tokenizer_for(mc)
                    except BaseException as e:  # noqa: BLE001 - raised below, on this thread
                        tok_box["err"] = e
                # The engine loads weights and compiles for a while: load the tokenizer meanwhile.
                tok_thread = threading.Thread(target=load, name="jaxserve-tokenizer", daemon=True)
                tok_thread.start()
            elif msg[0] == "startup_error":
                log.debug("engine process start-up failed:\n%s", msg[2])
                raise msg[1]
            elif msg[0] == "ready":
                if tok_thread is not None:
                    tok_thread.join()
                if "err" in tok_box:
                    raise tok_box["err"]
                return config, msg[1], tok_box.get("tok")

    # ------------------------------------------------------------------------------------- the pipes
    def start(self) -> None:
        pass  # the process and its pipe threads run from construction

    def _submit(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            self._adds_sent += 1
        self._outbox.put(cmd)

    def _send_loop(self) -> None:
        # Its own thread: a write blocks while the engine process is mid-step and the pipe is full (a burst of
        # long prompts), and the event loop must not.
        while True:
            cmd = self._outbox.get()
            if cmd is None:
                return
            try:
                self._cmd_w.send(cmd)
            except (OSError, BrokenPipeError):
                return  # the engine process is gone; the reader reports it
            except Exception as e:  # noqa: BLE001 - e.g. a payload that does not pickle: fail its request only
                log.exception("could not send %r to the engine process", cmd[0])
                if cmd[0] == "add":
                    self._emit(cmd[1], ValueError(f"the request could not be sent to the engine: {e}"), final=True)
                    self._adds_sent -= 1
                elif cmd[0] == "profile":
                    self._release_ack(cmd[1], f"could not send the profiler command: {e}")

    def _read_loop(self) -> None:
        err: BaseException | None = None
        try:
            while True:
                msg = self._out_r.recv()
                kind = msg[0]
                if kind == "out":
                    self._stats = msg[2]
                    outs = [self._decoder.decode(d) for d in msg[1]]
                    for o in outs:
                        if o.finished:
                            for fn in self._listeners:
                                fn(o)
                    self._emit_step(outs)
                elif kind == "aborted":
                    self._stats = msg[2]
                    self._emit_step([self._decoder.decode(msg[1])])  # no listeners: as in-process
                elif kind == "err":
                    self._stats = msg[3]
                    self._emit(msg[1], msg[2], final=True)
                elif kind == "ack":
                    self._release_ack(msg[1], msg[2])
                elif kind == "dead":
                    log.error("the engine process died:\n%s", msg[2])
                    err = msg[1]
                    break
        except (EOFError, OSError) as e:
            if self._stop:
                err = RuntimeError("the engine has shut down")
            else:
                err = RuntimeError(f"the engine process exited ({type(e).__name__}; exit code {self.proc.exitcode})")
        except BaseException as e:  # noqa: BLE001 - a front-end bug must not leave streams hanging
            log.exception("engine reader died")
            err = e
        # Whatever ended the pipe, nothing may wait on it any more: open streams and profiler calls fail now.
        self.dead_error, self.errored = err, True
        for rid in list(self._streams):
            self._emit(rid, err, final=True)
        for tag in list(self._acks):
            self._release_ack(tag, f"the engine process is gone: {err!r}")

    def _release_ack(self, tag: int, error: str | None) -> None:
        box = self._acks.get(tag)
        if box is not None and not box[0].is_set():
            box.append(error)
            box[0].set()

    def _has_requests(self) -> bool:
        return bool(self._streams)

    # ------------------------------------------------------------------------------------------ stats
    def stats(self) -> EngineStats:
        s = self._stats
        if not s:
            return EngineStats(num_waiting=self._adds_sent, cache_config=dict(self._cache_config))
        hist = TokenHistogram(list(s["iteration_counts"]), s["iteration_total"])
        return engine_stats(s, hist, max(0, self._adds_sent - s["adds_seen"]), self._cache_config)

    # -------------------------------------------------------------------------------------- profiling
    def _profile(self, folder: str | None, timeout: float = 300.0) -> None:
        with self._ack_lock:
            self._ack_tag += 1
            tag, box = self._ack_tag, [threading.Event()]
            self._acks[tag] = box
        if self.errored:  # checked after registering: the reader's death sweep releases every box it sees
            self._acks.pop(tag, None)
            raise RuntimeError(f"the engine process has died: {self.dead_error!r}")
        try:
            self._submit(("profile", tag, folder))
            if not box[0].wait(timeout):
                raise RuntimeError(f"the engine process did not answer the profiler command within {timeout} s")
        finally:
            self._acks.pop(tag, None)
        if box[1] is not None:
            raise RuntimeError(box[1])

    def start_profile(self, dir: str) -> None:
        if self._profiling:
            raise RuntimeError("a profile is being recorded")
        self._profile(os.fspath(dir))
        self._profiling = True

    def stop_profile(self) -> None:
        if not self._profiling:
            raise RuntimeError("no profile is being recorded")
        try:
            self._profile(None)
        finally:
            self._profiling = False  # a failed stop must not leave /stop_profile refusing forever

    # --------------------------------------------------------------------------------------- shutdown
    async def shutdown(self, grace_s: float) -> None:
        """Let in-flight requests finish for up to grace_s, abort the rest, stop the engine process."""
        deadline = time.monotonic() + grace_s
        while self._streams and time.monotonic() < deadline and not self.errored:
            await asyncio.sleep(0.05)
        for rid in list(self._streams):
            await self.abort(rid)
        await asyncio.sleep(0.1)
        self._stop = True
        self._submit(("shutdown",))
        self._outbox.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._join, 10.0)

    def _join(self, timeout: float) -> None:
        self.proc.join(timeout)
        if self.proc.is_alive():
            log.warning("the engine process did not stop within %.0f s: terminating it", timeout)
            self._kill()

    def _kill(self) -> None:
        if self.proc.is_alive():  # SIGKILL: the engine process ignores SIGTERM (see engine_process_main)
            self.proc.kill()
            self.proc.join(5)
