"""The lab around the recipe: benchmarks, the optimizer measurement, the headless notebook runner, the hub-snapshot
stand-in and its rehearsal, and the report that regenerates the tables of README.md and docs/. The recipe itself
(config, data, model, training, prediction, evaluation) is the package above; nothing there imports from here."""
