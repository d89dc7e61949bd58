"""The Trainer's notebook progress bar without its table of every logged loss: notebook 02 plots the curve instead.
Imported only inside a notebook (transformers' notebook module needs IPython)."""

from transformers.utils.notebook import NotebookProgressCallback, NotebookTrainingTracker


class ProgressBarOnly(NotebookProgressCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self.training_tracker = NotebookTrainingTracker(state.max_steps)  # no column names: no table

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass
