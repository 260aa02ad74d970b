"""Per-request sampling parameters, with vLLM's names and defaults (no JAX here)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

# Top-N logprobs are computed on device with a fixed N (one compiled shape); asking for more is an error.
MAX_LOGPROBS = 20


class RequestOutputKind(enum.Enum):
    """Which outputs the engine builds for a request (vLLM's names).

    CUMULATIVE: one output per step with all text and tokens so far (streaming consumers).
    FINAL_ONLY: only the finished output; a non-streaming request costs no per-step output work."""

    CUMULATIVE = 0
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    """What a user asks of one generation; validated on construction (ValueError names the field).

    Defaults follow vLLM: temperature 1.0, max_tokens 16. `top_k` 0 or -1 means off. `seed=None` draws a
    fresh seed per request, so the same seed gives the same tokens whatever else shares the batch.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Filled by the engine from the model: eos and generation_config stop ids (not user facing).
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._check()

    def _check(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"{name} {why}")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", f"must be an integer >= 1, got {self.n!r}")
        if self.temperature < 0:
            bad("temperature", f"must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", f"must be -1, 0 (off) or a positive integer, got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                bad(name, f"must be in [-2, 2], got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or not 0 <= v <= MAX_LOGPROBS):
                bad(name, f"must be an integer in [0, {MAX_LOGPROBS}], got {v!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", f"must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be a non-empty string or a list of non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be a list of non-negative integers")
        if not self.spaces_between_special_tokens:
            bad("spaces_between_special_tokens", "false is not supported (special tokens decode as the tokenizer "
                "writes them)")
        if self.logit_bias:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError):
                bad("logit_bias", "must map token ids to numbers")
            if any(not -100.0 <= v <= 100.0 for v in self.logit_bias.values()):
                bad("logit_bias", "values must be in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def __setattr__(self, name, value) -> None:
        self.__dict__.pop("_sampler_row", None)  # any change invalidates the cached sampler row
        object.__setattr__(self, name, value)

    @property
    def sampler_row(self) -> tuple:
        """The scalars the on-device sampler reads, cached (the runner asks for them every step):
        (temperature, top_k, top_p, min_p, presence, frequency, repetition, min_tokens, logprobs or -1,
        has logit_bias)."""
        row = self.__dict__.get("_sampler_row")
        if row is None:
            row = (self.temperature, self.top_k, self.top_p, self.min_p, self.presence_penalty,
                   self.frequency_penalty, self.repetition_penalty, self.min_tokens,
                   -1 if self.logprobs is None else self.logprobs, 1 if self.logit_bias else 0)
            self.__dict__["_sampler_row"] = row
        return row
