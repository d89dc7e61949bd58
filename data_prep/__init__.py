"""Turns AG News into chat-format examples: the task (`task`), where data comes from (`source`), reading (`read`),
cleaning (`clean`), splits (`splits`) and the JSONL writer (`convert_dataset`)."""
