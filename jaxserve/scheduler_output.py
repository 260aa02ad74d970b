"""What the scheduler hands the runner each step: the only thing the runner receives (no JAX)."""
from __future__ import annotations

from dataclasses import dataclass, field

from jaxserve.request import Request


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # computes all_token_ids[num_computed_tokens : num_computed_tokens + num_new_tokens]
    # How many samples to draw from this row's logits: 1 normally, n for an n > 1 parent whose
    # prompt completes this step (children fork from it afterwards), 0 while the prompt is unfinished.
    num_samples: int = 1


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # Device block copies to run before the forward pass (copy-on-write of shared blocks).
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # (src device block, dst device block)
    # Swap traffic, run before the forward pass: out = device -> host, in = host -> device.
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, host block)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host block, device block)
    preempted: list[Request] = field(default_factory=list)  # preempted this step (for metrics)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled and not self.blocks_to_swap_out
