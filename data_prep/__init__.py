"""Turns AG News into chat-format examples: prompts and labels (`config`), loading and splits (`convert_dataset`)."""
