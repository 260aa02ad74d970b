"""One mutable record per request: the `num_*` counters are the whole contract between the
scheduler (which decides how many tokens each request computes this step) and the runner
(which computes them). No JAX here.

A request's tokens are `all_token_ids = prompt + output`. Each step the scheduler gives it
`num_new` tokens starting at `num_computed_tokens`; when `num_computed_tokens + num_new ==
num_tokens` the step's logits at its last token are sampled (the request has caught up).
There is no prefill or decode phase: a decode is just a request one token behind.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from jaxserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted with its KV blocks copied to host memory
    FINISHED_STOPPED = "stop"  # eos, stop token id or stop string
    FINISHED_LENGTH = "length"  # max_tokens or max_model_len reached
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    # Samples of an n > 1 request: the parent is prefilled once, then `n` samples are drawn from its
    # last prompt logits and children fork off sharing its blocks (copy-on-write). `sample_index`
    # is this record's place among the n.
    sample_index: int = 0
    parent: Request | None = None

    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # of the prompt, found in the prefix cache at admission
    block_ids: list[int] = field(default_factory=list)  # the block table, in order
    num_preemptions: int = 0
    # timing for metrics
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def is_prefill(self) -> bool:
        """True while prompt tokens remain to compute (more than one token behind)."""
        return self.num_tokens - self.num_computed_tokens > 1

    # Async scheduling: a step is dispatched before the previous step's token reaches the host. The
    # request then carries a placeholder (-1) for that token; `placeholder_row` is the row of the
    # previous step's sampled ids that holds it on the device (the runner reads it from there).
    placeholder_row: int | None = None

    def append_placeholder(self, row: int) -> None:
        assert self.placeholder_row is None, "one token in flight at a time"
        self.placeholder_row = row
        self.output_token_ids.append(-1)
        self.all_token_ids.append(-1)

    def drop_placeholder(self) -> None:
        if self.placeholder_row is not None:
            self.placeholder_row = None
            self.output_token_ids.pop()
            self.all_token_ids.pop()

    def append_token(self, token_id: int) -> None:
        if self.placeholder_row is not None:  # the token the placeholder stood for has arrived
            self.placeholder_row = None
            self.output_token_ids[-1] = token_id
            self.all_token_ids[-1] = token_id
            return
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
