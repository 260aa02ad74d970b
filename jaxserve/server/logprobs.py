"""Engine logprobs (one dict[token_id -> Logprob] per position, vLLM's shape) in OpenAI's two formats.

- completions: {"tokens", "token_logprobs", "top_logprobs": [{token_str: logprob}], "text_offset"};
  like vLLM, a position's top_logprobs holds the top-N by rank plus the sampled token.
- chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}.
Streaming formats only the positions that are new in a chunk; `text_offset` continues from the text
already sent. -inf / NaN (JSON cannot carry them) become -9999.0, as in vLLM.
"""
from __future__ import annotations

import math
from typing import Any

from jaxserve.outputs import Logprob


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


def token_str(tid: int, lp: Logprob | None, tokenizer: Any) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    if tokenizer is not None:
        return tokenizer.decode([tid])
    return f"token_id:{tid}"


def _top(position: dict[int, Logprob], num_top: int) -> list[tuple[int, Logprob]]:
    ranked = [(t, lp) for t, lp in position.items() if lp.rank is not None and lp.rank <= num_top]
    return sorted(ranked, key=lambda x: x[1].rank)


class CompletionLogprobs:
    """Accumulates the completions-format logprobs of one choice; `text_offset` starts at `offset`."""

    def __init__(self, num_top: int, tokenizer: Any, offset: int = 0) -> None:
        self.num_top, self.tokenizer, self.offset = num_top, tokenizer, offset

    def format(self, token_ids: list[int], positions: list[dict[int, Logprob] | None]) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, pos in zip(token_ids, positions):
            sampled = pos.get(tid) if pos else None
            tok = token_str(tid, sampled, self.tokenizer)
            out["tokens"].append(tok)
            out["token_logprobs"].append(_finite(sampled.logprob) if sampled else None)
            if pos:
                top = {token_str(t, lp, self.tokenizer): _finite(lp.logprob) for t, lp in _top(pos, self.num_top)}
                if sampled is not None:
                    top.setdefault(tok, _finite(sampled.logprob))
                out["top_logprobs"].append(top)
            else:
                out["top_logprobs"].append(None)
            out["text_offset"].append(self.offset)
            self.offset += len(tok)
        return out


def chat_logprobs(token_ids: list[int], positions: list[dict[int, Logprob] | None], num_top: int,
                  tokenizer: Any) -> dict:
    content = []
    for tid, pos in zip(token_ids, positions):
        pos = pos or {}
        sampled = pos.get(tid)
        tok = token_str(tid, sampled, tokenizer)
        top = []
        for t, lp in _top(pos, num_top):
            s = token_str(t, lp, tokenizer)
            top.append({"token": s, "logprob": _finite(lp.logprob), "bytes": list(s.encode("utf-8", "replace"))})
        content.append({"token": tok, "logprob": _finite(sampled.logprob) if sampled else -9999.0,
                        "bytes": list(tok.encode("utf-8", "replace")), "top_logprobs": top})
    return {"content": content}
