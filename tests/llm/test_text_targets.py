"""Text targets f_T: batching, padding and pooling never change a text's vector."""

from __future__ import annotations

import pytest
import torch

from respiramfm.errors import ConfigError, DataError
from respiramfm.llm.backbones import TINY_ARCHS
from respiramfm.llm.text_embed import SPACES, pad_batch, pool, text_targets, tokenize


def one_at_a_time(bb, texts, space, max_tokens=125):
    return torch.cat([text_targets(bb, [t], space, max_tokens=max_tokens, batch_size=1) for t in texts])


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_batched_equals_single_for_every_space_and_side(arch, tiny, contexts):
    bb = tiny(arch)
    texts = contexts + ["x", "Patient presents with a cough.<|im_end|>"]  # the last ends in the pad (=eos) token
    for space in SPACES:
        alone = one_at_a_time(bb, texts, space)
        assert alone.shape == (len(texts), 64) and alone.dtype == torch.float32 and torch.isfinite(alone).all()
        for side in ("right", "left"):
            bb.set_padding_side(side)
            batched = text_targets(bb, texts, space, batch_size=4)
            torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
        bb.set_padding_side("right")
        # rows are distinct texts, so a pooling that ignored the text (or mixed rows) would show up here
        assert torch.cdist(alone, alone).fill_diagonal_(1.0).min() > 1e-4


def test_spaces_are_what_they_claim(tiny):
    bb = tiny("llama")
    text = "Gender: female. Age: 70."
    ids = torch.tensor([tokenize(bb, [text])[0]])
    with torch.no_grad():
        hidden = bb.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        embeds = bb.model.get_input_embeddings()(ids)[0]
    torch.testing.assert_close(text_targets(bb, [text], "hidden_mean")[0], hidden.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(text_targets(bb, [text], "last_token")[0], hidden[-1], atol=1e-6, rtol=0)
    torch.testing.assert_close(text_targets(bb, [text], "input_mean")[0], embeds.mean(0), atol=1e-7, rtol=0)


def test_truncation_to_max_tokens(tiny, contexts):
    bb = tiny("phi")
    long = contexts[0] * 8
    ids = tokenize(bb, [long], max_tokens=125)[0]
    assert len(ids) == 125
    head = bb.tokenizer.decode(ids[:10])
    truncated = text_targets(bb, [long], max_tokens=10)
    torch.testing.assert_close(truncated, text_targets(bb, [head], max_tokens=10), atol=1e-5, rtol=0)
    assert not torch.allclose(truncated, text_targets(bb, [long], max_tokens=125), atol=1e-3)


def test_deterministic_and_eval_mode(tiny, contexts):
    bb = tiny("phi")  # Phi-2 layout has resid dropout 0.1: a train-mode forward would be random
    bb.model.train()
    a = text_targets(bb, contexts, batch_size=2)
    b = text_targets(bb, contexts, batch_size=3)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert bb.model.training  # caller's mode is restored
    assert not a.requires_grad


def test_explicit_positions_matter_for_absolute_position_models(tiny):
    """Negative control: without counted position ids, left padding would shift GPT-2's positions."""
    bb = tiny("gpt2")
    seqs = tokenize(bb, ["Patient presents with no obvious respiratory symptoms.", "Age: 3."])
    ids, mask, positions = pad_batch(seqs, bb.pad_token_id, "left")
    assert positions[1].tolist()[-len(seqs[1]):] == list(range(len(seqs[1])))
    with torch.no_grad():
        naive = bb.decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    alone = text_targets(bb, ["Age: 3."])
    assert (pool(naive, mask, "mean")[1] - alone[0]).abs().max() > 1e-3
    bb.set_padding_side("left")
    torch.testing.assert_close(text_targets(bb, ["Patient presents with no obvious respiratory symptoms.",
                                                 "Age: 3."])[1], alone[0], atol=1e-5, rtol=0)


def test_pool_ignores_non_finite_padding():
    states = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [float("nan"), float("inf")]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(pool(states, mask, "mean"), torch.tensor([[2.0, 3.0]]))
    torch.testing.assert_close(pool(states, mask, "last"), torch.tensor([[3.0, 4.0]]))
    left = torch.tensor([[0, 1, 1]])
    states_left = torch.tensor([[[float("nan"), 0.0], [1.0, 2.0], [3.0, 4.0]]])
    torch.testing.assert_close(pool(states_left, left, "mean"), torch.tensor([[2.0, 3.0]]))


def test_bad_inputs(tiny):
    bb = tiny("llama")
    with pytest.raises(DataError, match=r"index \[1\]"):
        text_targets(bb, ["fine", ""])
    with pytest.raises(ConfigError, match="unknown text-target space"):
        text_targets(bb, ["fine"], space="cls")
    with pytest.raises(ConfigError, match="max_tokens"):
        text_targets(bb, ["fine"], max_tokens=0)
    with pytest.raises(ConfigError, match="batch_size"):
        text_targets(bb, ["fine"], batch_size=0)
    assert text_targets(bb, []).shape == (0, 64)


@pytest.mark.slow
def test_real_smollm2_batched_equals_single(smollm2_pair, contexts):
    bb = smollm2_pair[1]
    texts = [contexts[1], contexts[3], contexts[4]]  # short, of different lengths: padding happens
    for space in ("hidden_mean", "last_token"):  # input_mean involves no transformer layers
        alone = one_at_a_time(bb, texts, space)
        batched = text_targets(bb, texts, space, batch_size=len(texts))
        assert batched.shape == (len(texts), 576)
        # real hidden states reach |h| ~ 30: compare at 1e-5 of the largest magnitude
        torch.testing.assert_close(batched, alone, atol=1e-5 * alone.abs().max().item(), rtol=0)
