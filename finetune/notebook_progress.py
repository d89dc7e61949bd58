"""What the notebooks show while they run: the data notes as ordinary output, progress bars that an executed copy
keeps readable, and the Trainer's progress bar without its table of every logged loss (notebook 02 plots the curve).
Imported only inside a notebook (transformers' notebook module needs IPython)."""

import logging
import os
import sys

import tqdm.auto
import tqdm.std
from transformers.utils.notebook import NotebookProgressCallback, NotebookTrainingTracker

# Set by finetune.lab.notebooks for the kernels papermill starts (beside the variables that turn off the libraries'
# own loading and saving bars).
HEADLESS_ENV = "FINETUNE_HEADLESS"


class TextProgressBar(tqdm.std.tqdm):
    """A plain text bar on stdout: an executed copy shows its last frame, where a widget bar keeps only its first."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"file": sys.stdout, **kwargs})


def show_notes_and_progress() -> None:
    """Log records of the suite (load_splits' data notes) as plain output rather than a red stderr block, and in
    headless runs text progress bars. Call it before importing finetune.predict, whose bars take tqdm.auto's class
    when it is imported."""
    for name in ("data_prep", "finetune"):
        logger = logging.getLogger(name)
        if not any(getattr(handler, "stream", None) is sys.stdout for handler in logger.handlers):  # a re-run cell
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
    if os.environ.get(HEADLESS_ENV):
        tqdm.auto.tqdm = TextProgressBar


class ProgressBarOnly(NotebookProgressCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self.training_tracker = NotebookTrainingTracker(state.max_steps)  # no column names: no table

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass
