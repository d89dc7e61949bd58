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

from finetune.packed import PREFILL, opening_keys, pack_prefill, packed_attention

log = logging.getLogger(__name__)


class GreedyDecoder:
    """Decodes batches of up to `rows` prompts that all begin with one opening, whose cache (`opening_cache`, one row)
    was run once; each prompt's tail, at most `max_tail` tokens, goes on greedily until an `eos` token or
    `max_new_tokens` new ones. The tokens are the argmax of the logits, whatever the model's generation config says.
    `answer_length`: the new tokens, end token included, of the longest answer the model was trained to give.

    The prefill packs a batch's tails in one row, without padding (`finetune.packed.PackedPrefill`), and writes their
    keys and values into the cache, right-aligned. A batch with fewer rows keeps the shape the graph was captured for:
    its spare rows see only the opening, and their tokens are dropped. `cuda_graph` defaults to whether the model is on
    CUDA; without it each step runs as it is."""

    def __init__(self, model, opening_cache, opening_length: int, rows: int, max_tail: int, max_new_tokens: int,
                 eos: list[int], pad_id: int, answer_length: int = 1, cuda_graph: bool | None = None):
        device = model.device
        self.model, self.rows, self.max_new_tokens, self.pad_id = model, rows, max_new_tokens, pad_id
        self.answer_length = answer_length
        self.opening_length = opening_length
        self.opening_kv = opening_keys(opening_cache)
        self.length = opening_length + max_tail + max_new_tokens  # every key a batch can have
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache = StaticCache(config=config, max_cache_len=self.length)
        # allocated now: the prefill writes into it directly
        self.cache.early_initialization(rows, config.num_key_value_heads, head_dim, model.dtype, device)
        # The opening, in every row, once for all batches: a batch writes only the slots after it, and the slots it
        # does not write hold an earlier batch's keys, which no query of its sees (`seen`).
        for layer, opening_layer in zip(self.cache.layers, opening_cache.layers if opening_length else ()):
            layer.keys[:, :, :opening_length] = opening_layer.keys
            layer.values[:, :, :opening_length] = opening_layer.values
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
        new = torch.full((self.rows, self.max_new_tokens), self.pad_id, dtype=torch.long, device=self.model.device)
        first_key = self._prefill(tails, new)  # the cache slot of the first new token
        finished = torch.isin(new[:, 0], self.eos)
        steps = 1
        # The stop flag is read from `answer_length` new tokens on, one read a step: a read waits for the GPU to run
        # dry, and the GPU then waits for the host's next launch. Before that no row of a model answering as trained
        # has ended, so those steps queue back to back.
        while steps < self.max_new_tokens and (steps < self.answer_length or not bool(finished[:n].all())):
            self.tokens[:, 0] = new[:, steps - 1]
            self.seen[..., first_key + steps - 1] = True  # the key this step writes, its own
            self._step()
            self.positions += 1
            new[:, steps] = self.next_tokens
            finished |= torch.isin(self.next_tokens, self.eos)
            steps += 1
        return [row[: next((i + 1 for i, t in enumerate(row) if t in self.ends), steps)]
                for row in new[:n, :steps].tolist()]

    def _prefill(self, tails: list[list[int]], new: torch.Tensor) -> int:
        """Writes the tails (right-aligned, after the opening) into the cache, each row's first token into
        `new[:, 0]`; returns the slot after the tails. No query sees the slots before a shorter tail."""
        opening, n = self.opening_length, len(tails)
        prefill = pack_prefill(tails, opening, self.cache, self.model.device)
        with packed_attention(self.model, PREFILL):
            logits = self.model(input_ids=prefill.ids, position_ids=prefill.positions, use_cache=False,
                                attention_mask=dict.fromkeys(self.model.config.layer_types),
                                logits_to_keep=prefill.last_index, read_positions=prefill.last_index,
                                prefill=prefill, opening_kv=self.opening_kv).logits
        new[:n, 0] = logits[0].argmax(-1)
        for layer in self.cache.layers:  # the next step's key goes after the tails (`StaticLayer.update`)
            layer.cumulative_length.fill_(prefill.end)
        lengths = prefill.cu_q.diff()
        self.seen.zero_()
        self.seen[:, 0, 0, :opening] = True
        self.seen[:n, 0, 0, opening:prefill.end] = torch.arange(opening, prefill.end, device=lengths.device) >= (
            prefill.end - lengths[:, None])
        self.positions.fill_(opening)  # the spare rows': any position will do
        self.positions[:n, 0] = opening + lengths
        return prefill.end

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
        """One step, its layers uncompiled where they were compiled (`--compile_layers`): a layer writing into the
        cache reads its layer index, so each would compile its own graph, past torch's limit of 8 a function. The
        CUDA graph already takes the launches off the host, the step's work is reading the weights."""
        with torch.compiler.set_stance("force_eager"):
            logits = self.model(input_ids=self.tokens, attention_mask=self.seen, position_ids=self.positions,
                                past_key_values=self.cache, use_cache=True).logits
        self.next_tokens.copy_(logits[:, -1].argmax(-1))
