"""Which answer tokens carry a trained model's loss: the mean loss of each token of the trained answer, on the carve's
training articles, for runs `make tiny-lora-carve` trained. Label scoring sums each answer's log-probability, so the
answers' stem, the tokens every answer starts with (`{"category":"`), cancels out of it: loss there costs training
loss, not accuracy.

    python -m finetune.lab.answer_loss --profile tiny --runs full lora embedding   # -> results/methods/carve/
"""

import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoTokenizer

from finetune.config import RunConfig, command_from_args, command_parser
from finetune.data import to_prompt_completion
from finetune.lab.lora_carve import carve_run_name, carve_splits
from finetune.model import load_for_inference
from finetune.prompts import completion_token_ids
from finetune.results import environment

ARTICLES = 500  # the first of the carve's training articles: enough for a mean per token


def answer_token_losses(config: RunConfig, name: str, articles: int = ARTICLES) -> dict:
    """Mean loss per answer token (by its text) of the carve run `name`, and the share of the answer loss that falls on
    the answers' stem (written as `opening_*`, the keys of the committed results)."""
    final = dataclasses.replace(config, run_name=carve_run_name(config, name)).final_dir
    trained = json.loads((final / "train_summary.json").read_text())["config"]
    run = dataclasses.replace(config, **{k: trained[k] for k in ("model", "tokenizer", "method")})
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = load_for_inference(run, tokenizer, final)
    completions = completion_token_ids(tokenizer)
    n_stem = next(i for i, ids in enumerate(zip(*completions)) if len(set(ids)) > 1)
    losses, stem_loss, total = defaultdict(list), 0.0, 0.0
    train = carve_splits(config).train.iloc[:articles]
    examples = to_prompt_completion(train, tokenizer, config.max_length)  # as training saw them
    for example, label in zip(examples, train["label"]):
        ids = tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=True,
                                            return_dict=False)
        answer = completions[label]
        with torch.no_grad():
            logits = model(torch.tensor([ids], device=model.device)).logits[0, -len(answer) - 1:-1].float()
        token_losses = torch.nn.functional.cross_entropy(logits, torch.tensor(answer, device=logits.device),
                                                         reduction="none").tolist()
        for i, (token, loss) in enumerate(zip(answer, token_losses)):
            losses[tokenizer.decode([token])].append(loss)
            stem_loss += loss if i < n_stem else 0.0
            total += loss
    count = sum(map(len, losses.values()))
    return {"final": str(final), "mean_answer_token_loss": total / count, "opening_share_of_loss": stem_loss / total,
            "opening_tokens": [tokenizer.decode([t]) for t in completions[0][:n_stem]],
            "loss_by_token": {token: sum(v) / len(v) for token, v in losses.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = command_parser()
    parser.add_argument("--runs", nargs="+", required=True, help="carve candidate names (make tiny-lora-carve)")
    config, known = command_from_args(parser, argv, description=__doc__)
    record = {"articles": ARTICLES, "carve_side": "train", "config": config.to_dict(),
              "runs": {name: answer_token_losses(config, name) for name in known.runs}, "environment": environment()}
    path = Path(config.results_dir) / "methods" / "carve" / "answer_loss.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
