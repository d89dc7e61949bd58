"""The task's prompts and answers as a tokenizer's ids: where an over-long article is cut, what each answer's tokens
are, how many new tokens generation may take. Training's data (`finetune.data`), label scoring and generation read
them from here, so all three cut an article at the same token and score the tokens training taught."""

from transformers import PreTrainedTokenizerBase

from data_prep.task import LABELS, build_messages, build_prompt_messages

# Room past the longest trained answer (8 tokens with its end-of-turn, in Qwen2.5's tokenizer as in the tiny BPE) for
# an instruct model's own style: ```json\n{"category": "Sci/Tech"}\n``` and its end-of-turn take 13 Qwen2.5 tokens
# (the lenient reading needs 11, to the closing brace). Generation stops once every row has ended its turn, so a model
# answering as trained never spends it; one that never ends (the untrained tiny model) pays a decoding step per token.
ANSWER_HEADROOM_TOKENS = 8


def encode_prompts(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_prompt_tokens: int) -> tuple[list[list[int]], int]:
    """Chat-template token ids per article, ending with the assistant header. An article too long for
    `max_prompt_tokens` loses the end of its text, never the instruction or the answer slot."""
    encoded, shortened = _fitted_prompts(tokenizer, texts, max_prompt_tokens)
    return encoded, len(shortened)


class Prompts:
    """The prompts `encode_prompts` makes, each article's encoded when a pass first asks for it (`take`), so that
    evaluation's GPU starts on its first batch while the other articles are still text. Encoded all at once first,
    the 7,600 test articles took 0.54 s of label scoring's 11.6 s on an H100 machine, the GPU idle throughout
    (`tokenization_seconds` in results/benchmarks/h100_7b_eval_taught_200_repeats.json); a batch encoded while the
    one before it runs costs none of the GPU's time."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_prompt_tokens: int):
        self.tokenizer, self.texts, self.max_prompt_tokens = tokenizer, texts, max_prompt_tokens
        self.ids: dict[int, list[int]] = {}
        self.truncated = 0  # of the articles encoded so far

    def take(self, indices: list[int]) -> list[list[int]]:
        """The prompts of the articles at `indices`, those not yet encoded in one batched call."""
        new = [i for i in dict.fromkeys(indices) if i not in self.ids]
        if new:
            encoded, shortened = _fitted_prompts(self.tokenizer, [self.texts[i] for i in new], self.max_prompt_tokens)
            self.ids.update(zip(new, encoded))
            self.truncated += len(shortened)
        return [self.ids[i] for i in indices]


def fit_articles(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_prompt_tokens: int) -> list[str]:
    """The articles as `encode_prompts` reads them: each one too long for `max_prompt_tokens` cut at its end."""
    _, shortened = _fitted_prompts(tokenizer, texts, max_prompt_tokens)
    return [shortened.get(i, text) for i, text in enumerate(texts)]


def _fitted_prompts(tokenizer: PreTrainedTokenizerBase, texts: list[str],
                    limit: int) -> tuple[list[list[int]], dict[int, str]]:
    """Prompt token ids per article within `limit`, and the cut text of each article that had to be shortened."""
    rendered = tokenizer.apply_chat_template([build_prompt_messages(t) for t in texts], add_generation_prompt=True,
                                             tokenize=False)
    # One batched call: the fast tokenizer spreads it over threads (per-article calls are far slower over a test set).
    encoded = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    shortened = {}
    for i, ids in enumerate(encoded):
        if len(ids) > limit:
            shortened[i], encoded[i] = _shortened(tokenizer, texts[i], len(ids) - limit, limit)
    return encoded, shortened


def _shortened(tokenizer: PreTrainedTokenizerBase, text: str, excess: int, limit: int) -> tuple[str, list[int]]:
    """The article with its tail cut until the whole prompt fits `limit`, and that prompt's ids (a decode and
    re-encode can shift a token at the cut, hence the loop)."""
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = len(text_ids) - excess
    while True:
        kept = tokenizer.decode(text_ids[:max(keep, 0)])
        ids = _render(tokenizer, build_prompt_messages(kept), generation_prompt=True)
        if len(ids) <= limit or keep <= 0:
            return kept, ids
        keep -= len(ids) - limit


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                              return_dict=False))


def completion_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Each label's tokens after the prompt in a rendered training conversation, as TRL trains on them: the answer,
    its end-of-turn token and whatever the template adds after it (Qwen's newline)."""
    prompt = _render(tokenizer, build_prompt_messages("x"), generation_prompt=True)
    completions = []
    for label in LABELS:
        full = _render(tokenizer, build_messages("x", label), generation_prompt=False)
        if full[: len(prompt)] != prompt:
            raise ValueError("the chat template does not render the prompt as a prefix of the full conversation")
        completions.append(full[len(prompt):])
    return completions


def prompt_budget(tokenizer: PreTrainedTokenizerBase, max_length: int) -> int:
    """The tokens a prompt may take: `max_length` less the longest trained completion, so that training and
    evaluation cut an over-long article at the same token and every example keeps room for its answer."""
    return max_length - max(map(len, completion_token_ids(tokenizer)))


def answer_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Each label's answer tokens as training sees them: everything after the prompt through the end-of-turn token."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return [completion[: completion.index(end) + 1] for completion in completion_token_ids(tokenizer)]


def end_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end a generated answer: the end of the turn, or of the text. The suite's decoding and the plain
    `generate` anchor stop at the same ones, so that both decode the same answers."""
    return [tokenizer.convert_tokens_to_ids(token) for token in ("<|im_end|>", "<|endoftext|>")]


def default_max_new_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """The longest trained answer in this tokenizer's tokens, end-of-turn included, plus `ANSWER_HEADROOM_TOKENS`."""
    return max(map(len, answer_token_ids(tokenizer))) + ANSWER_HEADROOM_TOKENS
