"""Full fine-tuning of Qwen2.5-7B-Instruct on AG News."""
