"""Full fine-tuning of Qwen2.5-7B-Instruct on AG News."""

import logging

# transformers imports torchao whenever it is installed (its quantizer registry loads with every model), and torchao's
# import logs CUDA extensions failing to load (mxfp8, cutlass; or all of them under a torch it was not built for) and
# trips torch's deprecation of the Enum constants it registers: a red block above every notebook's first model load.
# What this suite takes from torchao (the optimizers' stochastic rounding and 8-bit maps, FP8 training) needs none
# of those extensions. Only these messages are dropped; anything else either logger says still shows.
logging.getLogger("torchao").addFilter(
    lambda record: not record.getMessage().startswith(("Failed to load", "Skipping import of cpp extensions")))
logging.getLogger("torch.utils._pytree").addFilter(
    lambda record: "register_constant() on Enum subclasses is deprecated" not in record.getMessage())
