"""Training throughput: real tokens/s and model FLOPs utilization (MFU), logged to TensorBoard with the loss."""

import statistics
import time
from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model
from transformers import PretrainedConfig, TrainerCallback

# Dense bf16 tensor-core peaks from the vendors' datasheets, by device-name substring (first match wins).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "GB10": 125.0}


def bf16_peak_tflops(gpu_name: str) -> float | None:
    """The dense bf16 peak of the GPU named `gpu_name` (as CUDA names it), or None for an unlisted one."""
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in gpu_name), None)


def peak_flops() -> float | None:
    """The GPU's dense bf16 peak in FLOP/s, or None where it is unknown (CPU, unlisted GPUs)."""
    if not torch.cuda.is_available():
        return None
    tflops = bf16_peak_tflops(torch.cuda.get_device_name(0))
    return None if tflops is None else tflops * 1e12


def reset_peak_memory() -> None:
    """Free cached blocks and restart the peak counters, so the next measurement stands alone (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(reserved: bool = False) -> float | None:
    """Peak GPU memory since the last reset, allocated by tensors (or reserved by the allocator); None on CPU."""
    if not torch.cuda.is_available():
        return None
    return (torch.cuda.max_memory_reserved() if reserved else torch.cuda.max_memory_allocated()) / 2**30


def mean_article_tokens(train_dataset) -> float:
    """Mean tokens per article in TRL's prepared dataset (packed rows list each article's length)."""
    lengths = _article_lengths(train_dataset)
    return sum(lengths) / len(lengths)


def article_lengths_by_row(train_dataset) -> list[list[int]]:
    """Each row's articles' lengths in TRL's prepared dataset: packed rows list theirs, an unpacked row is one."""
    if "seq_lengths" in train_dataset.column_names:
        return train_dataset["seq_lengths"]
    return [[len(ids)] for ids in train_dataset["input_ids"]]


def _article_lengths(train_dataset) -> list[int]:
    return [n for row in article_lengths_by_row(train_dataset) for n in row]


@dataclass(frozen=True)
class ArticleTokens:
    """What sets a training step's FLOPs per token, read from TRL's prepared dataset."""

    attention_length: float  # sum of L^2 / sum of L: the article length an average token attends within
    loss_share: float  # the share of tokens that carry loss (labels != -100): the answer tokens
    opening_share: float = 0.0  # the share of tokens a shared opening does not run (finetune.opening)
    opening_length: int = 0  # the shared opening's tokens
    last_layer_where_read: bool = False  # the last layer's MLP only where the loss reads (finetune.last_layer)


def article_tokens(train_dataset, opening_length: int = 0, rows_per_micro_batch: int = 1,
                   last_layer_where_read: bool = False) -> ArticleTokens:
    """The token-weighted article length and the loss-bearing share of the tokens of TRL's prepared dataset; with an
    opening of `opening_length` tokens shared per micro-batch of `rows_per_micro_batch` packed rows, the share of
    the tokens it saves over an epoch: every article's opening but one a micro-batch; and whether the last layer's MLP
    runs only where the loss reads."""
    lengths = _article_lengths(train_dataset)
    if "labels" in train_dataset.column_names:
        labelled = sum(label != -100 for row in train_dataset["labels"] for label in row)
    else:  # a preparation that leaves the completion mask for the collator to turn into labels
        labelled = sum(map(sum, train_dataset["completion_mask"]))
    micro_batches = -(-len(train_dataset) // rows_per_micro_batch)
    saved = (len(lengths) - micro_batches) * opening_length if opening_length else 0
    return ArticleTokens(sum(n * n for n in lengths) / sum(lengths), labelled / sum(lengths), saved / sum(lengths),
                         opening_length, last_layer_where_read)


def training_flops_per_token(config: PretrainedConfig, tokens: ArticleTokens, adapter_params: int | None = None,
                             head_on_every_token: bool = False) -> float:
    """Forward + backward FLOPs per real token that a training step needs: the decoder's matmuls for every token, the
    LM head for the tokens whose logits are computed, and causal attention within each article.

    Matmuls cost 2 FLOPs per weight and token forward and 4 backward (gradients of input and weight). Embedding
    lookups, norms and activations are not counted; recomputation (gradient checkpointing, the fused loss recomputing
    its logits in backward) never is: the count is what the step needs, not what a recipe spends.

    The LM head: TRL 1.16's loss (its fused LM head, `trl.trainer.utils.add_fused_lm_head`) projects only the positions
    whose next-token label is not -100, the answer tokens (`tokens.loss_share`, ~7.5 of ~102.5 per article), wherever
    Triton is available; the suite's FusedHeadSFTTrainer forces that path on every device. `head_on_every_token`
    counts every position instead: TRL's path where there is no Triton (fixed tile shapes), e.g. stock TRL on the CPU.
    Liger's fused linear cross-entropy never runs under TRL 1.16: TRL's SFTTrainer turns it off with
    `use_liger_kernel` (it would replace the forward TRL patches with its fused head) and applies only Liger's layer
    kernels, so Liger rows compute the head as every other row does.

    Attention: scores and values cost 2 x 2 x (query heads x head dim) per earlier position forward, and twice that
    backward; a causal token at position i of its article sees i + 1 positions, (L + 1) / 2 on average over an article
    of L tokens, which over articles of different lengths, weighted by tokens, is (sum L^2 / sum L + 1) / 2.

    A shared opening (`tokens.opening_share`, finetune.opening): the tokens it does not run cost neither their
    matmuls nor their attention (the opening's token i sees i + 1 positions, (n + 1) / 2 on average); every token
    that runs sees what it saw with its own copy of the opening. Counted per token of the articles, as the rates are.
    With `tokens.last_layer_where_read` (finetune.last_layer) the last layer's MLP runs for the answer tokens only.

    LoRA and QLoRA (`adapter_params`, the adapters' trainable parameters): the frozen matmuls, the LM head among them,
    run forward (2 per parameter) and backward to their inputs (2), but compute no weight gradient; the adapters cost
    the full 6. QLoRA is counted the same (bf16 matmul FLOPs after dequantization), so its MFU shows what the 4-bit
    weights cost. FP8 matmuls are counted as these same FLOPs, against the bf16 peak.
    """
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    run = 1 - tokens.opening_share
    mlp_params = 3 * hidden * config.intermediate_size
    layer_params = hidden * (hidden + 2 * kv) + hidden * hidden + mlp_params
    decoder_params = run * layers * layer_params
    if tokens.last_layer_where_read:  # the last layer's MLP for the answer tokens alone
        decoder_params -= (run - tokens.loss_share) * mlp_params
    head_params = hidden * config.vocab_size * (run if head_on_every_token else tokens.loss_share)
    keys_seen = (tokens.attention_length + 1) / 2 - tokens.opening_share * (tokens.opening_length + 1) / 2
    attention = layers * 2 * 2 * config.num_attention_heads * head_dim * keys_seen
    if adapter_params is None:
        return 6 * (decoder_params + head_params) + 3 * attention
    return 4 * (decoder_params + head_params) + 6 * adapter_params + 3 * attention


def lm_head_on_every_token(trainer) -> bool:
    """Whether `trainer`'s loss projects every position through the LM head: TRL's own `compute_loss` where Triton is
    missing (stock TRL on the CPU). The suite's FusedHeadSFTTrainer (finetune.train) overrides it to score only the
    answer tokens on every device, as TRL itself does wherever Triton is."""
    import trl
    from trl.trainer.utils import _use_triton

    return type(trainer).compute_loss is trl.SFTTrainer.compute_loss and not _use_triton(trainer.args.device)


def adapter_parameters(model: torch.nn.Module) -> int | None:
    """The trainable parameters of a peft model (its adapters); None for a model trained whole."""
    if not is_peft_model(model):
        return None
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class ThroughputCallback(TrainerCallback):
    """Adds tokens_per_second and (on a known GPU) mfu to every log line, from TRL's running `num_tokens`; the run's
    last line gets their medians over the logging intervals. An interval in which a checkpoint was written reports
    nothing: the write is not training speed (it is timed on its own in the training summary)."""

    def __init__(self, model_config: PretrainedConfig, tokens: ArticleTokens, adapter_params: int | None = None):
        self.flops_per_token = training_flops_per_token(model_config, tokens, adapter_params)
        self.peak = peak_flops()
        self.last = None  # (time, tokens) at the previous log
        self.rates: list[float] = []
        self.saved = False

    def on_save(self, args, state, control, **kwargs):
        self.saved = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        added = self._speeds(args, logs)
        logs.update(added)  # what the loggers after this one (TensorBoard) see
        if added and state.log_history:  # the Trainer copied `logs` there before calling the callbacks
            state.log_history[-1].update(added)

    def _speeds(self, args, logs: dict) -> dict:
        if "train_runtime" in logs:  # the Trainer's closing summary, not an interval (TRL may have no num_tokens in it)
            if not self.rates:
                return {}
            median = statistics.median(self.rates)
            return {"train_tokens_per_second_median": median,
                    **({"train_mfu_median": median * self.flops_per_token / self.peak} if self.peak else {})}
        if "num_tokens" not in logs:
            return {}
        now, tokens = time.perf_counter(), float(logs["num_tokens"])
        speeds = {}
        if self.last is not None and tokens > self.last[1] and not self.saved:
            rate = (tokens - self.last[1]) / (now - self.last[0]) / max(args.world_size, 1)
            self.rates.append(rate)
            speeds = {"tokens_per_second": rate}
            if self.peak:
                speeds["mfu"] = rate * self.flops_per_token / self.peak
        self.last, self.saved = (now, tokens), False
        return speeds
