"""Fold a LoRA or QLoRA run's adapter into its base model: a standalone checkpoint that `from_pretrained` loads.

    python -m finetune.merge --profile tiny --run_name tiny-ag-news-lora --model <base>   # -> checkpoints/<run>/merged

The base is the run config's `model`, loaded in its own dtype (a QLoRA adapter is merged into the unquantized weights,
as peft recommends: merging into 4-bit weights would round the update away).
"""

import dataclasses
from pathlib import Path

from transformers import AutoTokenizer

from finetune.adapters import is_adapter, with_adapter
from finetune.config import RunConfig, command_from_args, command_parser
from finetune.model import load_model
from finetune.sources import SourceNotFound, check_source


def merge_adapter(config: RunConfig, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Base model + the adapter at `adapter_dir`, merged, saved with its tokenizer to `out_dir`."""
    if not is_adapter(adapter_dir):
        raise SourceNotFound(f"{adapter_dir} holds no adapter_config.json: merge takes the final/ folder of a run "
                                "trained with --method lora or qlora (a full fine-tuning run is standalone already)")
    check_source(config.model, "model")  # the base, named before any weights load
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    base = load_model(dataclasses.replace(config, method="full"), tokenizer)
    merged = with_adapter(base, adapter_dir, merge=True)
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = command_parser()
    parser.add_argument("--adapter_path", help="the adapter folder (default: the run's final/)")
    parser.add_argument("--out", help="where the merged model goes (default: the run's merged/)")
    config, known = command_from_args(parser, argv, description=__doc__)
    try:
        out = merge_adapter(config, known.adapter_path or config.final_dir, known.out or config.output_dir / "merged")
    except SourceNotFound as error:  # no adapter there, or no base model: the message says which
        raise SystemExit(f"error: {error}") from None
    print(f"merged model: {out}")


if __name__ == "__main__":
    main()
