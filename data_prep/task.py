"""The task definition: labels, prompts and answer format. These strings exist nowhere else."""

import json

# AG News order: CSV class index 1-4 and hub label 0-3 both map onto this list.
LABELS: tuple[str, ...] = ("World", "Sports", "Business", "Sci/Tech")

# Short on purpose, since every example repeats it; it names the labels and the JSON shape so that an instruct
# model can answer in the right format before any fine-tuning.
SYSTEM_PROMPT = 'Classify news articles as World, Sports, Business or Sci/Tech. Reply in JSON: {"category":"<label>"}'
USER_TEMPLATE = "Classify the following news article:\n\n{text}"


def format_answer(label: str) -> str:
    """The assistant's answer, compact JSON: `{"category":"World"}`."""
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}; expected one of {LABELS}")
    return json.dumps({"category": label}, separators=(",", ":"))


def build_prompt_messages(text: str) -> list[dict[str, str]]:
    """System and user turns: what the model sees before it answers."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": USER_TEMPLATE.format(text=text)},
    ]


def build_messages(text: str, label: str) -> list[dict[str, str]]:
    """One training conversation: system, user and the assistant's answer."""
    return build_prompt_messages(text) + [{"role": "assistant", "content": format_answer(label)}]
