"""jaxserve/tokenizer.py: streaming detokenization, stop strings, chat templates (SmolLM2's byte-level BPE)."""

import json
import shutil

import pytest

from jaxserve.models.default_model import default_model_path
from jaxserve.tokenizer import find_stop_string, load_tokenizer, stop_string_holdback

TEXTS = {
    "emoji": "Hi 😀👍🏽! Family: 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 done ✅",
    "cjk": "AI 的未来发展。日本語のテキスト、한국어 문장입니다。",
    "code": "def f(x):\n    return {'a': x ** 2}  # ok\n\tif a != b:\n        pass\n",
    "mixed": "Ünïcödé — café naïve; 12345 + 3.14 = π?  spaces   and\r\nnewlines\n\n€100 😀中文",
}


@pytest.fixture(scope="module")
def tok():
    try:
        return load_tokenizer(default_model_path(progress=False))
    except Exception as e:
        pytest.skip(f"default model unavailable: {e}")


def expected_stream_text(tok, ids):
    """Full decode, less a trailing incomplete character (decoded as U+FFFD), which a stream holds back."""
    return tok.decode(ids).rstrip("\ufffd")


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_incremental_equals_full_decode_at_every_prefix(tok, name):
    ids = tok.encode(TEXTS[name])
    assert tok.decode(ids) == TEXTS[name]
    detok = tok.incremental_detokenizer()
    for k, token_id in enumerate(ids, 1):
        delta = detok.add(token_id)
        assert "\ufffd" not in delta
        assert detok.text == expected_stream_text(tok, ids[:k]), (k, detok.text)
    assert detok.text == TEXTS[name]


def test_multibyte_char_split_over_tokens_is_held(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1  # byte-level: the 4 UTF-8 bytes span several tokens
    detok = tok.incremental_detokenizer()
    deltas = [detok.add(i) for i in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "😀"


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_incremental_with_prompt_context(tok, name):
    prompt = tok.encode("Question: say something.\nAnswer:")
    out = tok.encode(" " + TEXTS[name])
    detok = tok.incremental_detokenizer(prompt)
    text = "".join(detok.add(i) for i in out)
    assert text == tok.decode(prompt + out)[len(tok.decode(prompt)):]
    assert text == " " + TEXTS[name]


def test_special_tokens_skip_or_keep(tok):
    ids = tok.encode("Paris.<|im_end|>\n<|im_start|>user")
    assert 2 in ids and 1 in ids
    for skip in (True, False):
        detok = tok.incremental_detokenizer(skip_special_tokens=skip)
        text = detok.add_many(ids)
        assert text == tok.decode(ids, skip_special_tokens=skip)
    assert "<|im_end|>" in tok.decode(ids, skip_special_tokens=False)
    assert "<|im_end|>" not in tok.decode(ids)


def test_stop_ids_and_encode(tok):
    assert tok.stop_token_ids == (2,) and tok.eos_token_id == 2
    assert tok.encode("hello") == tok.encode("hello", add_special_tokens=False)  # SmolLM2 adds no BOS


def test_find_stop_string():
    assert find_stop_string("abc STOP def", ["STOP"]) == ("abc ", "STOP")
    assert find_stop_string("abc STOP def", ["STOP"], include_stop_str_in_output=True) == ("abc STOP", "STOP")
    assert find_stop_string("abc STOP def", ["def", "STOP"]) == ("abc ", "STOP")  # earliest, not first listed
    assert find_stop_string("xxab", ["ab", "xab"]) == ("x", "xab")
    assert find_stop_string("no stop here", ["STOP"]) == ("no stop here", None)
    assert find_stop_string("anything", []) == ("anything", None)
    # A stop straddling the boundary of the previously searched text is still found.
    assert find_stop_string("hello ST" + "OP!", ["STOP"], search_from=len("hello ST")) == ("hello ", "STOP")


def test_stop_string_holdback():
    assert stop_string_holdback("hello ST", ["STOP"]) == 2
    assert stop_string_holdback("hello S", ["STOP", "Sx"]) == 1
    assert stop_string_holdback("hello", ["STOP"]) == 0
    assert stop_string_holdback("aaa", ["aaab"]) == 3
    assert stop_string_holdback("abc", ["c", "bcd"]) == 2  # "c" alone is a full match, handled by find
    assert stop_string_holdback("", ["STOP"]) == 0


@pytest.mark.parametrize("include", [False, True])
def test_streaming_client_never_sees_retracted_text(tok, include):
    """Simulate the server loop: per token, search for stops, send text minus the hold-back."""
    stops = ["</answer>", "\n\nUser:", "😀中"]
    full = "The answer is <b>42</b> </ans and more </answer> trailing"
    for text_in in (full, TEXTS["mixed"], "x\n\nUse then \n\nUser: gone", "ends with </ans"):
        detok = tok.incremental_detokenizer()
        sent, final, searched = "", None, 0
        for token_id in tok.encode(text_in):
            delta = detok.add(token_id)
            cut, matched = find_stop_string(detok.text, stops, include, search_from=searched)
            searched = len(detok.text)
            visible = cut if matched else cut[:len(cut) - stop_string_holdback(cut, stops)]
            assert visible.startswith(sent)  # the client only ever gets appended to
            sent = visible
            if matched:
                final = cut
                break
        final = detok.text if final is None else final  # end of stream: the held-back tail is flushed
        assert final.startswith(sent)
        assert final == find_stop_string(text_in, stops, include)[0]


def test_chat_template_errors_and_override(tok, tmp_path):
    folder = tmp_path / "no_template"
    folder.mkdir()
    src = default_model_path(progress=False)
    shutil.copy(src / "tokenizer.json", folder / "tokenizer.json")
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    bare = load_tokenizer(folder)
    assert bare.chat_template is None and bare.stop_token_ids == (2,)  # falls back to the tokenizer's eos
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template(msgs)
    tpl = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
           "{% if add_generation_prompt %}>{% endif %}")
    assert bare.apply_chat_template(msgs, chat_template=tpl) == "[user] hi\n>"
    assert bare.apply_chat_template(msgs, chat_template=tpl, add_generation_prompt=False) == "[user] hi\n"
    parts = [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template(msgs)
    with pytest.raises(ValueError, match="content part"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])


def test_load_tokenizer_needs_local_folder(tmp_path):
    with pytest.raises(ValueError, match="not a local folder"):
        load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ValueError, match="not a local folder"):
        load_tokenizer(tmp_path / "missing")
