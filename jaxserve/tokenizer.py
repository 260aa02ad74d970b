"""Tokenizer: encode/decode, chat templates, streaming detokenization and stop strings.

Design notes
- A thin wrapper over a transformers *fast* tokenizer loaded from a local folder only: jaxserve never
  downloads from the hub, so a name that is not a folder is an error that says so.
- Decoding goes through the Rust `tokenizers.Tokenizer` (`backend_tokenizer`) both for full decodes and for the
  streaming detokenizer, so the two agree exactly (same special-token skipping, no clean-up of spaces).
- Stop token ids come from generation_config.json / config.json `eos_token_id` (an int or a list), not from
  tokenizer.eos_token: chat models often stop on a token the tokenizer does not call eos.
- IncrementalDetokenizer is vLLM's prefix_offset/read_offset method, on ids:
      prefix_text = decode(ids[prefix_offset:read_offset]);  new_text = decode(ids[prefix_offset:])
  The delta new_text[len(prefix_text):] is emitted less any trailing U+FFFD (a UTF-8 character split over
  several byte-level tokens is held back until complete; the text before it goes out at once); once new_text
  ends in a complete character the window slides (prefix_offset = read_offset, read_offset = len(ids)).
  Decoding a window that starts a few tokens back, rather than the new token alone, keeps decoder-dependent
  spacing (leading-space stripping in SentencePiece decoders, merges across tokens) identical to a full decode.
- Stop strings: `find_stop_string` finds the earliest stop in the text; `stop_string_holdback` is the length
  of the longest suffix of the text that is a proper prefix of some stop string. A streaming client is sent
  text[:len(text) - holdback], so it never sees characters that a later stop match would take back.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

_PROMPT_CONTEXT = 5  # prompt tokens the detokenizer decodes as context for the first output token (as vLLM)


class Tokenizer:
    def __init__(self, hf_tokenizer, stop_token_ids: Sequence[int]):
        self.hf = hf_tokenizer
        self.backend = hf_tokenizer.backend_tokenizer  # tokenizers.Tokenizer
        self.stop_token_ids = tuple(stop_token_ids)
        self.eos_token_id = self.stop_token_ids[0] if self.stop_token_ids else None
        self.special_ids = frozenset(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)
        self.vocab_size = len(hf_tokenizer)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def chat_template(self) -> str | None:
        return self.hf.chat_template

    def apply_chat_template(self, messages: list[dict], chat_template: str | None = None,
                            add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text for a chat. ValueError (an HTTP 400 for the server) if no template exists."""
        if chat_template is None and self.hf.chat_template is None:
            raise ValueError("this model's tokenizer has no chat template and the request gave none "
                             "(pass chat_template, or use the completions API)")
        return self.hf.apply_chat_template([_flatten(m) for m in messages], chat_template=chat_template,
                                           add_generation_prompt=add_generation_prompt, tokenize=False,
                                           **kwargs)

    def incremental_detokenizer(self, prompt_ids: Sequence[int] = (),
                                skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)


def _flatten(message: dict) -> dict:
    """OpenAI content parts [{"type": "text", "text": ...}, ...] -> one string (templates expect a str)."""
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ValueError(f"unsupported message content part: {part!r} (only text parts)")
            texts.append(part["text"])
        message = {**message, "content": "".join(texts)}
    return message


def _stop_ids_from(folder: Path) -> list[int]:
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        try:
            eos = json.loads((folder / name).read_text()).get("eos_token_id")
        except (OSError, ValueError):
            continue
        for i in eos if isinstance(eos, list) else [eos]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Tokenizer:
    """A Tokenizer from a local HF folder (tokenizer.json + tokenizer_config.json)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"tokenizer {str(path)!r} is not a local folder: jaxserve loads tokenizers from local "
                         "HF folders only (no hub downloads)")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    if not getattr(hf, "is_fast", False) or getattr(hf, "backend_tokenizer", None) is None:
        raise ValueError(f"{folder} has no fast tokenizer (tokenizer.json); jaxserve needs one")
    stop = _stop_ids_from(folder) or ([hf.eos_token_id] if hf.eos_token_id is not None else [])
    return Tokenizer(hf, stop)


def tokenizer_for(model_config) -> Tokenizer | None:
    """The tokenizer a ModelConfig names (None with skip_tokenizer_init), with its chat template override."""
    if model_config.skip_tokenizer_init:
        return None
    tokenizer = load_tokenizer(model_config.tokenizer)
    if model_config.chat_template:
        tokenizer.hf.chat_template = model_config.chat_template
    return tokenizer


class IncrementalDetokenizer:
    """Feed output token ids one at a time; get back the new text each adds (see the module notes).

    `text` is everything emitted so far; it equals decode(output ids) except for a trailing incomplete
    UTF-8 character, which is held back until the token(s) completing it arrive."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Context: the last few prompt tokens, so the first output token decodes with the right spacing.
        self.ids: list[int] = list(prompt_ids[-(_PROMPT_CONTEXT + 1):])
        self.prefix_offset = max(len(self.ids) - _PROMPT_CONTEXT, 0)
        self.read_offset = len(self.ids)
        self.pending = 0  # chars past decode(ids[prefix_offset:read_offset]) already emitted (see add)
        self.text = ""

    def add(self, token_id: int) -> str:
        """The text delta (possibly "") that token_id adds."""
        if self.skip_special_tokens and token_id in self.tokenizer.special_ids:
            return ""  # skipped tokens change nothing; keep them out of the window as well
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        new_text = decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        complete = not new_text.endswith("\ufffd")
        # Text before a trailing incomplete character is final already (appending bytes cannot change it),
        # so it goes out now: " " + half an emoji emits the space.
        stable = new_text if complete else new_text.rstrip("\ufffd")
        start = len(prefix_text) + self.pending
        delta = stable[start:] if len(stable) > start else ""
        if complete and len(new_text) > len(prefix_text):
            self.prefix_offset, self.read_offset, self.pending = self.read_offset, len(self.ids), 0
        else:
            self.pending += len(delta)
        self.text += delta
        return delta

    def add_many(self, token_ids: Sequence[int]) -> str:
        return "".join(self.add(t) for t in token_ids)


def find_stop_string(text: str, stop: Sequence[str], include_stop_str_in_output: bool = False,
                     search_from: int = 0) -> tuple[str, str | None]:
    """(text cut at the earliest stop string, that stop) or (text, None) if none occurs.

    The cut text ends before the stop, or after it with include_stop_str_in_output. search_from: where the
    text not yet searched begins (len before the last delta); a stop may straddle it, so the search starts
    max(len(stop)) - 1 characters earlier."""
    if not stop:
        return text, None
    start = max(0, search_from - max(len(s) for s in stop) + 1)
    best, best_stop = -1, None
    for s in stop:  # earliest position wins; a tie goes to the stop listed first
        if not s:
            continue
        i = text.find(s, start)
        if i != -1 and (best == -1 or i < best):
            best, best_stop = i, s
    if best_stop is None:
        return text, None
    end = best + len(best_stop) if include_stop_str_in_output else best
    return text[:end], best_stop


def stop_string_holdback(text: str, stop: Sequence[str]) -> int:
    """How many trailing characters of text could be the start of a stop string (0 if none)."""
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), hold, -1):  # longest proper prefix of s ending the text
            if text.endswith(s[:k]):
                hold = k
                break
    return hold
