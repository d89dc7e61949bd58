"""The shared opening in training: its layout, the unshared batch's loss and gradients, and what the trainer counts."""

import dataclasses

import datasets
import numpy as np
import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from data_prep.task import LABELS, build_messages
from finetune.attention import VARLEN, choose_attn_implementation
from finetune.model import load_model, train_bpe_tokenizer
from finetune.opening import TOKENS_SAVED, SharedOpeningCollator, share_opening, training_opening

TEXTS = ["Stocks rally as profits beat forecasts.", "The striker scored twice in the final.",
         "Rebels and troops agree to a ceasefire.", "NASA tests a new chip for its probes.",
         "Oil prices climb on supply worries.", "A new browser promises faster pages."]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(TEXTS * 20, vocab_size=400, cache_dir=tmp_path_factory.mktemp("tok"))


def _examples(tokenizer) -> list[dict]:
    """Two packed rows of three articles each, as TRL's bfd packing leaves them: the loss on each answer."""
    rows = []
    for k in range(2):
        articles = []
        for i in range(3 * k, 3 * k + 3):
            prompt = tokenizer.apply_chat_template(build_messages(TEXTS[i], LABELS[i % 4])[:2], tokenize=True,
                                                   return_dict=False, add_generation_prompt=True)
            whole = tokenizer.apply_chat_template(build_messages(TEXTS[i], LABELS[i % 4]), tokenize=True,
                                                  return_dict=False)
            articles.append((whole, [-100] * len(prompt) + whole[len(prompt):]))
        rows.append({"input_ids": sum((a for a, _ in articles), []), "labels": sum((b for _, b in articles), []),
                     "seq_lengths": [len(a) for a, _ in articles]})
    return rows


def test_each_article_sees_the_opening_and_its_own_tokens_at_its_own_positions(tokenizer):
    examples = _examples(tokenizer)
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    unshared = collate(examples)
    opening = training_opening(datasets.Dataset.from_list(examples))
    assert 10 < len(opening) < min(n for e in examples for n in e["seq_lengths"])
    shared = SharedOpeningCollator(collate, opening)(examples)
    n, ids, positions = len(opening), shared["input_ids"][0], shared["position_ids"][0]
    cu_q, cu_k, key_index = shared["cu_seq_lens_q"], shared["cu_seq_lens_k"], shared["opening_key_index"]
    assert ids[:n].tolist() == opening and len(ids) == unshared["input_ids"].shape[1] - 5 * n
    assert shared[TOKENS_SAVED] == 5 * n
    cu = unshared["cu_seq_lens_q"]
    for article in range(6):
        whole = unshared["input_ids"][0, cu[article]:cu[article + 1]]
        keys = key_index[cu_k[article + 1]:cu_k[article + 2]]
        queries = slice(cu_q[article + 1], cu_q[article + 2])
        # its keys are its whole prompt and answer, at the positions it had alone; its queries are the last ones
        assert ids[keys].tolist() == whole.tolist()
        assert positions[keys].tolist() == list(range(len(whole)))
        assert ids[queries].tolist() == whole[n:].tolist()
        assert shared["labels"][0, queries].tolist() == unshared["labels"][0, cu[article] + n:cu[article + 1]].tolist()
    assert (shared["labels"][0, :n] == -100).all()
    assert shared["max_length_k"] == int(cu.diff().max())


def test_an_article_without_the_opening_is_refused(tokenizer):
    examples = _examples(tokenizer)
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    opening = training_opening(datasets.Dataset.from_list(examples))
    with pytest.raises(ValueError, match="share_opening false"):
        share_opening(collate(examples), [opening[0] + 1] + opening[1:])


def _loss_and_gradients(model, batch: dict) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    inputs = {k: v for k, v in batch.items() if k not in ("seq_idx", TOKENS_SAVED)}
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_shared_opening_gives_the_unshared_loss_and_gradients(tiny_config, tokenizer):
    """fp32 on the CPU (the exact padded path of the varlen attention): one copy of the opening, every article
    attending to it, trains the weights exactly as each article with its own copy."""
    choose_attn_implementation("auto", packing=True, share_opening=True)
    torch.manual_seed(0)
    model = load_model(tiny_config, tokenizer, VARLEN)
    examples = _examples(tokenizer)
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    shared_collate = SharedOpeningCollator(collate, training_opening(datasets.Dataset.from_list(examples)))
    unshared_loss, unshared_grads = _loss_and_gradients(model, collate(examples))
    shared_loss, shared_grads = _loss_and_gradients(model, shared_collate(examples))
    torch.testing.assert_close(shared_loss, unshared_loss, atol=1e-6, rtol=1e-6)
    for name, grad in unshared_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    # Not a comparison that holds anyway: the same batch with one article's opening keys one token off differs.
    off_loss, _ = _loss_and_gradients(model, _opening_one_token_off(shared_collate(examples)))
    assert not torch.allclose(off_loss, unshared_loss, atol=1e-4)


def _opening_one_token_off(batch: dict) -> dict:
    """The batch with the second article's opening keys each the next token (the last, its first own token)."""
    start, n = int(batch["cu_seq_lens_k"][2]), int(batch["cu_seq_lens_q"][1])
    batch["opening_key_index"][start:start + n] += 1
    return batch


def test_other_attention_implementations_cannot_share_the_opening():
    with pytest.raises(ValueError, match="share_opening=False"):
        choose_attn_implementation("flash_attention_2", packing=True, share_opening=True)
    assert choose_attn_implementation("auto", packing=True, share_opening=True) == VARLEN


def test_training_shares_the_opening_and_counts_every_article_token(tiny_config):
    """The trainer's batches run one opening each, and its token count (tokens/s, the benchmarks' ratios) is the
    articles' tokens: the same as the unshared run's."""
    from finetune.train import build_trainer

    counts = {}
    for share in (True, False):
        config = dataclasses.replace(tiny_config, share_opening=share, max_steps=3, logging_steps=1,
                                     run_name=f"share-{share}", last_layer_where_read=False)  # its own collator
        trainer = build_trainer(config)
        assert isinstance(trainer.data_collator, SharedOpeningCollator) == share
        assert (trainer.article_tokens.opening_share > 0.2) == share
        trainer.train()
        counts[share] = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
        ran = trainer._total_train_tokens  # TRL's count: the tokens the model ran
        assert (ran < 0.8 * counts[share][-1]) == share and (ran == counts[share][-1]) != share
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        counts[share, "loss"] = losses
    assert counts[True] == counts[False] and len(counts[True]) == 3
    np.testing.assert_allclose(counts[True, "loss"], counts[False, "loss"], rtol=1e-4)


@pytest.mark.gpu
def test_shared_opening_gives_the_unshared_loss_and_gradients_through_the_cuda_kernel(tiny_config, tokenizer):
    """The CUDA path: PyTorch's FlashAttention-2 varlen kernel, forward and backward, with each article's queries its
    last keys (more keys than queries). The kernel runs in bf16 (fp32 weights around it), so the two layouts round
    differently: bounded at 1e-3 of the loss and 2% of each weight's gradient norm. An article's opening keys one token
    off move the gradients by more, which the last assertion shows (the loss of a random model barely moves)."""
    config = dataclasses.replace(tiny_config, hidden_size=256, num_heads=4, intermediate_size=512, bf16=False)
    choose_attn_implementation("auto", packing=True, share_opening=True)
    torch.manual_seed(0)
    model = load_model(config, tokenizer, VARLEN).cuda()
    examples = _examples(tokenizer)
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    shared_collate = SharedOpeningCollator(collate, training_opening(datasets.Dataset.from_list(examples)))

    def on_gpu(batch):
        return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}

    unshared_loss, unshared_grads = _loss_and_gradients(model, on_gpu(collate(examples)))
    shared_loss, shared_grads = _loss_and_gradients(model, on_gpu(shared_collate(examples)))
    worst = max(float((shared_grads[n] - g).norm() / g.norm()) for n, g in unshared_grads.items() if g.norm() > 0)
    print(f"loss {unshared_loss:.6f} vs {shared_loss:.6f}, worst relative gradient difference {worst:.4f}")
    assert abs(shared_loss - unshared_loss) < 1e-3 * unshared_loss and worst < 0.02
    off_loss, off_grads = _loss_and_gradients(model, on_gpu(_opening_one_token_off(shared_collate(examples))))
    off = max(float((off_grads[n] - g).norm() / g.norm()) for n, g in unshared_grads.items() if g.norm() > 0)
    print(f"an article's opening keys one token off: worst relative gradient difference {off:.4f}")
    assert off > 5 * worst


def test_the_plans_row_estimate_matches_the_tokens_a_shared_batch_runs(tiny_config):
    """`row_tokens_run`, which the memory plan reads before TRL prepares the data, against what the trainer's batches
    run: the share of their articles' tokens left after the openings (the one opening each batch keeps aside), within
    3%."""
    from finetune.opening import row_tokens_run
    from finetune.train import build_trainer

    trainer = build_trainer(tiny_config)
    texts = list(trainer.splits.train["text"])
    estimate = row_tokens_run(trainer.processing_class, texts, tiny_config.max_length) / tiny_config.max_length
    ran = articles = 0
    for batch, _ in zip(trainer.get_train_dataloader(), range(8)):
        opening = int(batch["cu_seq_lens_q"][1])
        ran += batch["input_ids"].shape[1] - opening
        articles += batch["input_ids"].shape[1] + batch[TOKENS_SAVED]
    assert 0.4 < estimate < 0.9 and estimate == pytest.approx(ran / articles, rel=0.03)
