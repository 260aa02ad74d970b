"""Offline batch inference over a JSONL file in OpenAI's batch format (after vLLM's run_batch).

    python scripts/run_batch.py -i requests.jsonl -o results.jsonl [--model FOLDER] [engine flags]

Input, one request a line:
    {"custom_id": "r1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "...", "max_tokens": 32}}
    {"custom_id": "r2", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [...]}}
Output, one line per input line, in completion order (match them by custom_id):
    {"id": "batch_req_...", "custom_id": "r1", "response": {"status_code": 200, "request_id": "cmpl-...",
     "body": <the server's JSON answer>}, "error": null}
A line that cannot be served (bad JSON, unknown url, a body the server would answer 400, a prompt over the
context) gets status_code 400, the server's error body, and "error": {"code", "message"}; the batch goes on.

Bodies are read exactly as the server reads them: the same pydantic schemas, the same checks and the
same body -> SamplingParams translation (jaxserve/server/protocol.py). Requests go straight into the
engine of one `jaxserve.LLM` (at most --max-inflight lines at a time), so the engine batches across
lines and a line is written (and flushed) as soon as all of its choices finish.

Resuming: when the output file exists, its custom_ids are done and are skipped; new lines are appended.
A last line cut off by a kill mid-write is dropped first. Re-running a finished batch does nothing.
"""
from __future__ import annotations

import argparse
import copy
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from tqdm import tqdm

from jaxserve.server.errors import APIError, error_body, from_validation_error
from jaxserve.server.protocol import (ChatCompletionRequest, CompletionRequest, chat_messages, check_unbuilt,
                                      to_sampling_params)

URLS = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}


@dataclass
class Job:
    """One input line: its parsed request and, once queued, its engine requests (one per prompt)."""
    line_no: int
    custom_id: Any
    url: str = ""
    req: Any = None
    prompts: list = field(default_factory=list)  # str | list[int] | {"prompt_token_ids": ...}
    request_id: str = ""
    outputs: dict = field(default_factory=dict)  # prompt index -> finished RequestOutput
    error: APIError | None = None


def parse_line(line_no: int, text: str) -> Job:
    """Schema-level parse; engine-dependent checks (tokenizer, context length) come when the job is queued."""
    try:
        obj = json.loads(text)
    except ValueError as e:
        return Job(line_no, None, error=APIError(400, f"line {line_no}: invalid JSON: {e}"))
    if not isinstance(obj, dict):
        return Job(line_no, None, error=APIError(400, f"line {line_no}: a request must be a JSON object"))
    job = Job(line_no, obj.get("custom_id"), url=obj.get("url", ""))
    if not isinstance(job.custom_id, str) or not job.custom_id:
        job.error = APIError(400, f"line {line_no}: custom_id must be a non-empty string", "custom_id")
    elif obj.get("method", "POST") != "POST":
        job.error = APIError(400, f"method must be POST, got {obj.get('method')!r}", "method")
    elif job.url not in URLS:
        job.error = APIError(400, f"url must be one of {sorted(URLS)}, got {job.url!r}", "url")
    else:
        try:
            job.req = URLS[job.url].model_validate(obj.get("body"))
        except ValidationError as e:
            job.error = from_validation_error(e)
        else:
            if job.req.stream:
                job.error = APIError(400, "stream is not supported in a batch", "stream")
    return job


class Runner:
    """Feeds jobs to the engine of one LLM and turns finished engine outputs into response bodies."""

    def __init__(self, llm, writer: "Writer", bar: tqdm) -> None:
        self.llm, self.engine, self.writer, self.bar = llm, llm.llm_engine, writer, bar
        self.tokenizer = self.engine.tokenizer
        self.model_name = self.engine.model_config.served_model_name
        self.owner: dict[str, tuple[Job, int]] = {}  # engine request id -> (job, prompt index)
        self.active: dict[int, Job] = {}

    def queue(self, job: Job) -> None:
        """Turn the body into engine requests; any 400 the server would give becomes the line's error."""
        try:
            self._queue(job)
        except APIError as e:
            job.error = e
        except ValueError as e:  # the engine's refusal (context length, token ids out of range, ...)
            job.error = APIError(400, str(e))
        if job.error is not None:
            for rid in [r for r, (j, _) in self.owner.items() if j is job]:
                self.engine.abort_request(rid)
                del self.owner[rid]
            self.finish(job)

    def _queue(self, job: Job) -> None:
        from jaxserve.server.completions import normalize_prompts

        req = job.req
        check_unbuilt(req, self.engine.model_config.max_logprobs)
        params = to_sampling_params(req, self.engine.generation_defaults or {})
        chat = isinstance(req, ChatCompletionRequest)
        job.request_id = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(16)}"
        job.prompts = [self._render_chat(req)] if chat else normalize_prompts(req.prompt)
        for i, prompt in enumerate(job.prompts):
            rid = f"{job.request_id}-{i}"
            self.engine.add_request(rid, prompt, copy.copy(params))  # the engine keeps state on params
            self.owner[rid] = (job, i)
        self.active[job.line_no] = job

    def _render_chat(self, req: ChatCompletionRequest) -> dict:
        if self.tokenizer is None:
            raise APIError(400, "chat needs a tokenizer, and this engine runs with --skip-tokenizer-init", "messages")
        try:
            text = self.tokenizer.apply_chat_template(chat_messages(req.messages),
                                                      add_generation_prompt=req.add_generation_prompt)
        except Exception as e:  # noqa: BLE001  a template that fails on these messages (jinja errors)
            raise APIError(400, f"chat template failed on these messages: {e}", "messages") from None
        # The template holds the special tokens already (bos): encode without adding them again.
        return {"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}

    def step(self) -> None:
        for out in self.engine.step():
            if not out.finished or out.request_id not in self.owner:
                continue
            job, i = self.owner.pop(out.request_id)
            job.outputs[i] = out
            if len(job.outputs) == len(job.prompts):
                del self.active[job.line_no]
                self.finish(job)

    def abort_all(self) -> None:
        for rid in list(self.owner):
            self.engine.abort_request(rid)
        self.owner.clear()

    def finish(self, job: Job) -> None:
        if job.error is not None:
            e = job.error
            response = {"status_code": e.status, "request_id": job.request_id or None,
                        "body": error_body(e.status, e.message, e.param)}
            error = {"code": error_body(e.status, "")["error"]["type"], "message": e.message}
        else:
            body = self._chat_body(job) if job.url == "/v1/chat/completions" else self._completion_body(job)
            response, error = {"status_code": 200, "request_id": job.request_id, "body": body}, None
        self.writer.write({"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": job.custom_id,
                           "response": response, "error": error})
        self.bar.update(1)

    def _header(self, job: Job, kind: str) -> dict:
        return {"id": job.request_id, "object": kind, "created": int(time.time()), "model": self.model_name}

    def _completion_body(self, job: Job) -> dict:
        # The non-streaming /v1/completions answer (jaxserve/server/completions.py:_full), from finished outputs.
        from jaxserve.server.common import usage
        from jaxserve.server.completions import completion_choices

        choices = completion_choices(job.req, job.outputs, job.prompts, self.tokenizer)
        return {**self._header(job, "text_completion"), "choices": choices, "usage": usage(job.outputs)}

    def _chat_body(self, job: Job) -> dict:
        # The non-streaming /v1/chat/completions answer (jaxserve/server/chat.py:_full).
        from jaxserve.server.common import choices_of, usage
        from jaxserve.server.logprobs import chat_logprobs

        req = job.req
        choices = []
        for idx, _, _, c in choices_of(job.outputs, req.n):
            lp = None
            if req.logprobs:
                lp = chat_logprobs(list(c.token_ids), list(c.logprobs or []), req.top_logprobs or 0, self.tokenizer)
            choices.append({"index": idx, "message": {"role": "assistant", "content": c.text}, "logprobs": lp,
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        return {**self._header(job, "chat.completion"), "choices": choices, "usage": usage(job.outputs)}


class Writer:
    """Appends one JSON line per finished request and flushes it, so a kill loses at most the line being
    written (which the next run drops)."""

    def __init__(self, path: Path) -> None:
        self.f = path.open("a", encoding="utf-8")

    def write(self, obj: dict) -> None:
        self.f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def read_done(path: Path) -> tuple[set[str], set[str]]:
    """What an earlier run's output already answers: its custom_ids, and the error messages of lines that had
    no usable custom_id (they name the line number, so the same line is not answered twice). A cut-off last
    line is truncated away."""
    if not path.exists():
        return set(), set()
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1  # everything after the last newline is a partial write
    if keep < len(data):
        with path.open("r+b") as f:
            f.truncate(keep)
    ids, anonymous = set(), set()
    for raw in data[:keep].splitlines():
        try:
            obj = json.loads(raw)
            cid = obj.get("custom_id")
            if isinstance(cid, str):
                ids.add(cid)
            elif obj.get("error"):
                anonymous.add(obj["error"]["message"])
        except (ValueError, AttributeError, KeyError, TypeError):
            continue
    return ids, anonymous


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from jaxserve.config import EngineArgs

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input-file", required=True, help="JSONL of OpenAI batch requests")
    p.add_argument("-o", "--output-file", required=True, help="JSONL of responses (appended to when it exists)")
    p.add_argument("--max-inflight", type=int, default=1024,
                   help="input lines held in the engine at once (bounds host memory on huge files)")
    p.add_argument("--disable-tqdm", action="store_true")
    EngineArgs.add_cli_args(p.add_argument_group("engine"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    ns = parse_args(argv)
    out_path = Path(ns.output_file)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done, done_anonymous = read_done(out_path)
    with open(ns.input_file, encoding="utf-8") as f:
        lines = [(n, t) for n, t in enumerate(f, 1) if t.strip()]
    jobs, seen = [], set(done)
    duplicates = []
    for n, text in lines:
        job = parse_line(n, text)
        cid = job.custom_id if isinstance(job.custom_id, str) else None
        if cid in done or (cid is None and job.error is not None and job.error.message in done_anonymous):
            continue
        if cid is not None and cid in seen:
            job.error = APIError(400, f"line {n}: duplicate custom_id {job.custom_id!r}", "custom_id")
            duplicates.append(job)  # answered last, so its output line cannot mark the first one done
            continue
        if cid is not None:
            seen.add(cid)
        jobs.append(job)
    summary = {"total": len(lines), "skipped_done": len(lines) - len(jobs) - len(duplicates), "ok": 0, "errors": 0}
    if not jobs and not duplicates:
        print(f"nothing to do: all {len(lines)} lines of {ns.input_file} are answered in {out_path}")
        return summary

    from jaxserve import LLM
    from jaxserve.config import EngineArgs

    writer = Writer(out_path)
    bar = tqdm(total=len(jobs) + len(duplicates), desc="batch", unit="req", disable=ns.disable_tqdm)
    runner = None
    try:
        good = [j for j in jobs if j.error is None]
        llm = LLM(**vars(EngineArgs.from_cli_args(ns))) if good else None
        runner = Runner(llm, writer, bar) if llm is not None else _ErrorsOnly(writer, bar)
        pending = iter(jobs)
        exhausted = False
        while True:
            while not exhausted and len(runner.active) < ns.max_inflight:
                job = next(pending, None)
                if job is None:
                    exhausted = True
                elif job.error is not None:
                    runner.finish(job)
                else:
                    runner.queue(job)
            if not runner.active:
                break
            if not runner.engine.has_unfinished_requests():
                raise RuntimeError(f"the engine went idle with {len(runner.active)} lines unanswered")
            runner.step()
        for job in duplicates:
            runner.finish(job)
    except BaseException:
        if runner is not None and hasattr(runner, "abort_all"):
            runner.abort_all()
        raise
    finally:
        bar.close()
        writer.close()
    results = [json.loads(x) for x in out_path.read_text(encoding="utf-8").splitlines() if x.strip()]
    summary["ok"] = sum(r["error"] is None for r in results)
    summary["errors"] = len(results) - summary["ok"]
    print(f"{out_path}: {summary['ok']} ok, {summary['errors']} errors ({summary['skipped_done']} answered "
          f"before this run)")
    return summary


class _ErrorsOnly(Runner):
    """Every pending line is already an error: answer them without starting an engine."""

    def __init__(self, writer: Writer, bar: tqdm) -> None:
        self.writer, self.bar, self.active, self.owner = writer, bar, {}, {}


if __name__ == "__main__":
    main()
