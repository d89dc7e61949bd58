"""Reading a generated answer back as a label, two ways.

Strict: the exact trained answer `{"category":"<label>"}`, outer whitespace aside; what a fine-tuned model emits.
Lenient: the first JSON object anywhere in the text, its "category" key and its label matched in any case; what an
instruct model answering in its own style (a code fence, spaces, an extra key, a sentence after it) still gets credit
for.
Each returns (class index, None), or (-1, the kind of failure).
"""

import json

from data_prep.task import LABELS, format_answer


def parse_lenient(text: str) -> tuple[int, str | None]:
    """The label named by the first JSON object in `text`; failures: empty, no_json, no_category, unknown_label."""
    if not text.strip():
        return -1, "empty"
    found = _first_object(text)
    if found is None:
        return -1, "no_json"
    answer = found[0]
    key = _category_key(answer)
    if key is None:
        return -1, "no_category"
    category = answer[key]
    lowered = [label.lower() for label in LABELS]
    if not isinstance(category, str) or category.lower() not in lowered:
        return -1, "unknown_label"
    return lowered.index(category.lower()), None


def parse_strict(text: str) -> tuple[int, str | None]:
    """The label if `text` is exactly a trained answer, outer whitespace aside. Otherwise the lenient failure where
    there is one, else what was off, the first that applies of: code_fence, extra_text (anything outside the JSON
    object), extra_keys, case (of the label), spacing (the same JSON written another way: spaces, newlines, escapes)."""
    label, failure = parse_lenient(text)
    if failure:
        return -1, failure
    if text.strip() == format_answer(LABELS[label]):
        return label, None
    answer, start, end = _first_object(text)
    if "```" in text:
        return -1, "code_fence"
    if text[:start].strip() or text[end:].strip():
        return -1, "extra_text"
    if len(answer) > 1:
        return -1, "extra_keys"
    if answer.get("category") != LABELS[label]:  # the key's case or the label's
        return -1, "case"
    return -1, "spacing"


def _category_key(answer: dict) -> str | None:
    """"category" itself, else the first key that is "category" in another case ("Category", "CATEGORY")."""
    if "category" in answer:
        return "category"
    return next((key for key in answer if key.lower() == "category"), None)


def _first_object(text: str) -> tuple[dict, int, int] | None:
    """The first JSON object in `text` with its start and end offsets; a "{" that opens no valid JSON is skipped."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            answer, end = decoder.raw_decode(text, start)
            return answer, start, end
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None
