"""Greedy decoding over a static key/value cache: on the GPU, every step after a run's first is one CUDA graph launch.

transformers' `generate` launches each step's kernels from Python, a few hundred a step for the 7B, and reads a stop
flag back after it: the GPU waits on the host for part of every step (decoding every article kept it busy 79% of its
profile, results/benchmarks/h100_7b_eval_recipe_generation.json). With the cache at a fixed shape and address
(transformers' `StaticCache`) and the step's inputs in fixed buffers, a step runs the same kernels on the same memory
each time, so it is captured once and replayed.
"""

import logging

import torch
from transformers import StaticCache

log = logging.getLogger(__name__)


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of `rows` right-aligned in one batch, the mask 1 on real tokens."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


class GreedyDecoder:
    """Decodes batches of up to `rows` prompts that all begin with one opening, whose cache (`opening_cache`, one row)
    was run once; each prompt's tail, at most `max_tail` tokens, goes on greedily until an `eos` token or
    `max_new_tokens` new ones. The tokens are the argmax of the logits, whatever the model's generation config says.

    A batch with fewer rows is filled up with copies of its last tail, so that every batch has the shape the graph was
    captured for. `cuda_graph` defaults to whether the model is on CUDA; without it each step runs as it is."""

    def __init__(self, model, opening_cache, opening_length: int, rows: int, max_tail: int, max_new_tokens: int,
                 eos: list[int], pad_id: int, cuda_graph: bool | None = None):
        device = model.device
        self.model, self.rows, self.max_new_tokens, self.pad_id = model, rows, max_new_tokens, pad_id
        self.opening_cache, self.opening_length = opening_cache, opening_length
        self.length = opening_length + max_tail + max_new_tokens  # every key a batch can have
        self.cache = StaticCache(config=model.config, max_cache_len=self.length)
        self.eos, self.ends = torch.tensor(eos, device=device), set(eos)
        # A step's inputs and output at fixed addresses: each row's newest token, its position, the keys it sees.
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros_like(self.tokens)
        self.seen = torch.zeros(rows, 1, 1, self.length, dtype=torch.bool, device=device)
        self.next_tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        self.graph = None

    def decode(self, tails: list[list[int]]) -> list[list[int]]:
        """Each tail's new tokens, through the end token where it reached one."""
        n = len(tails)
        ids, valid = left_pad(tails + [tails[-1]] * (self.rows - n), self.pad_id, self.model.device)
        first_key = self.opening_length + ids.shape[1]  # the cache slot of the first new token
        new = torch.empty(self.rows, self.max_new_tokens, dtype=torch.long, device=ids.device)
        new[:, 0] = self._prefill(ids, valid)
        finished = torch.isin(new[:, 0], self.eos)
        steps = 1
        # One read of the stop flag a step: with the step one graph launch, the GPU idles only while the host queues
        # the next one.
        while steps < self.max_new_tokens and not bool(finished[:n].all()):
            self.tokens[:, 0] = new[:, steps - 1]
            self.seen[..., first_key + steps - 1] = True  # the key this step writes, its own
            self._step()
            self.positions += 1
            new[:, steps] = self.next_tokens
            finished |= torch.isin(self.next_tokens, self.eos)
            steps += 1
        return [row[: next((i + 1 for i, t in enumerate(row) if t in self.ends), steps)]
                for row in new[:n, :steps].tolist()]

    def _prefill(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Writes the opening (copied into every row) and the tails into the cache; returns each row's first token.
        Left padding sits between the opening and each tail: no query sees it, positions skip it."""
        opening, width = self.opening_length, ids.shape[1]
        self.cache.reset()
        if opening:
            for layer_index, layer in enumerate(self.opening_cache.layers):
                self.cache.update(layer.keys.expand(self.rows, -1, -1, -1), layer.values.expand(self.rows, -1, -1, -1),
                                  layer_index)
        self.seen.zero_()
        self.seen[:, 0, 0, :opening] = True
        self.seen[:, 0, 0, opening:opening + width] = valid.bool()
        keys = torch.arange(self.length, device=ids.device)
        queries = opening + torch.arange(width, device=ids.device)[:, None]
        # Causal over the keys seen; each query also sees itself, so that a padding query's softmax is never empty
        # (an empty one would put NaN into the keys and values it writes).
        mask = (self.seen & (keys <= queries)) | (keys == queries)
        positions = opening + (valid.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                            use_cache=True, logits_to_keep=1).logits
        self.positions.copy_(positions[:, -1:] + 1)
        return logits[:, -1].argmax(-1)

    def _step(self) -> None:
        """One token for every row: `tokens` in, `next_tokens` out, the cache one key longer. On CUDA the first step
        runs as it is on a stream of its own (it compiles this shape's kernels and sizes the allocator, as capture
        needs) and is then captured there; every later one, in this batch and the next, replays the capture."""
        if not self.cuda_graph:
            return self._forward()
        if self.graph is not None:
            return self.graph.replay()
        # A capture that fails leaves its stream allocating into the graph's memory: this stream is dropped after it.
        # It also leaves the default CUDA generator's state marked as capturing, and every later CUDA random draw in
        # the process (a model's initialization, dropout) raises: the generator gets this copy of its state back.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        generator = torch.cuda.default_generators[torch.cuda.current_device()]  # the one capture_begin registers
        rng_before = generator.clone_state()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            self._forward()
            try:
                graph.capture_begin()
                try:
                    self._forward()  # recorded; runs nothing
                finally:
                    graph.capture_end()
            except RuntimeError as e:  # a kernel that cannot be captured (the step above ran all the same)
                cause = e.__context__ or e  # what failed in the step, where ending the capture then failed too
                log.warning("decoding steps run one launch at a time: capturing a step as a CUDA graph failed (%s)",
                            str(cause).splitlines()[0])
                self.cuda_graph = False
                generator.graphsafe_set_state(rng_before)
            else:
                self.graph = graph
        torch.cuda.current_stream().wait_stream(stream)

    def _forward(self) -> None:
        logits = self.model(input_ids=self.tokens, attention_mask=self.seen, position_ids=self.positions,
                            past_key_values=self.cache, use_cache=True).logits
        self.next_tokens.copy_(logits[:, -1].argmax(-1))
