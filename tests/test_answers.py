"""Generated answers read strictly (the exact trained JSON) and leniently (the first JSON object, any case), each
failure named by what was off."""

import pytest

from finetune.answers import parse_lenient, parse_strict

# (answer as an instruct model writes it, strict reading, lenient reading)
ANSWERS = [
    ('{"category":"Sports"}', (1, None), (1, None)),
    (' {"category":"Sci/Tech"}\n', (3, None), (3, None)),
    ('```json\n{"category": "Sports"}\n```', (-1, "code_fence"), (1, None)),
    ('{"category":"World"} The article is about a summit of foreign ministers.', (-1, "extra_text"), (0, None)),
    ('Here is the classification: {"category":"Business"}', (-1, "extra_text"), (2, None)),
    ('{"category":"Business","confidence":0.9}', (-1, "extra_keys"), (2, None)),
    ('{"category":"sports"}', (-1, "case"), (1, None)),
    ('{"category": "Sports"}', (-1, "spacing"), (1, None)),
    ('{"Category": "Sports"}', (-1, "case"), (1, None)),  # the key in any case too
    ('{"CATEGORY":"world"}', (-1, "case"), (0, None)),
    ('{"Category":"Sports","category":"World"}', (-1, "extra_keys"), (0, None)),  # the exact key first
    ('{\n  "category": "Sci/Tech"\n}', (-1, "spacing"), (3, None)),
    ("", (-1, "empty"), (-1, "empty")),
    ("   \n", (-1, "empty"), (-1, "empty")),
    ("The category is World.", (-1, "no_json"), (-1, "no_json")),
    ('{"category":"Spo', (-1, "no_json"), (-1, "no_json")),
    ('["Sports"]', (-1, "no_json"), (-1, "no_json")),
    ('{"label":"World"}', (-1, "no_category"), (-1, "no_category")),
    ('{"category":"Politics"}', (-1, "unknown_label"), (-1, "unknown_label")),
    ('{"category":null}', (-1, "unknown_label"), (-1, "unknown_label")),
    ('{oops} then {"category":"World"}', (-1, "extra_text"), (0, None)),  # a brace that opens no JSON is skipped
]


@pytest.mark.parametrize("answer, strict, lenient", ANSWERS)
def test_each_answer_form_reads_as_expected_strictly_and_leniently(answer, strict, lenient):
    assert parse_strict(answer) == strict
    assert parse_lenient(answer) == lenient
