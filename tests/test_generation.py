"""Ragged batched generation: prompts of different lengths decoded together, left-padded, give exactly
the tokens each prompt gets alone; the test-set responses use it."""
import numpy as np
import pytest

from minigpt import GPTConfig, GPTModel, generate, no_grad
from minigpt.cpu import parallel
from minigpt.model import KVCache
from minigpt.pipeline.responses import generate_responses, response_batches
from minigpt.tokenizer import byte_tokenizer

EOS = 7


@pytest.fixture(scope="module")
def model():
    """A small random model whose greedy continuations vary (GPT-2's 0.02 init makes them constant)."""
    model = GPTModel(GPTConfig(vocab_size=40, context_length=48, emb_dim=32, n_heads=4, n_layers=2), seed=3)
    for name, p in model.named_parameters():
        if not name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            p.data *= 25.0
    return model.eval()


def prompts_of_lengths(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(8, 40, size=n)) for n in lengths]   # ids >= 8: no prompt holds EOS


def test_a_ragged_batch_gives_each_prompt_its_own_greedy_tokens(model):
    prompts = prompts_of_lengths([3, 11, 1, 6, 6, 17])
    together = generate(model, prompts, 20, eos_id=EOS)
    stops = 0
    for prompt, row in zip(prompts, together):
        alone = generate(model, np.array([prompt]), 20, eos_id=EOS)[0]
        assert list(row[:len(alone)]) == list(alone)              # the same tokens, up to where it stopped
        assert np.all(row[len(alone):] == EOS)                    # then only end-of-text padding
        new = alone[len(prompt):]
        assert len(set(new.tolist())) > 1 or new[-1] == EOS       # the continuations are not all one token
        stops += EOS in new
    # some rows stopped at their own EOS, not all
    assert 0 < stops < len(prompts)


def test_padded_rows_see_the_same_logits_as_alone(model):
    prompts = prompts_of_lengths([2, 9, 5], seed=1)
    T = max(map(len, prompts))
    padded = np.zeros((3, T), dtype=np.int64)
    for row, prompt in zip(padded, prompts):
        row[T - len(prompt):] = prompt
    with no_grad():
        cache = KVCache(model.cfg, 3, T + 1, model.dtype, pad=[T - len(p) for p in prompts])
        together = model(padded, kv_cache=cache, last_only=True).data[:, -1]
        for i, prompt in enumerate(prompts):
            alone = model(np.array([prompt]), last_only=True).data[0, -1]
            np.testing.assert_allclose(together[i], alone, rtol=1e-5, atol=1e-5)


def test_a_ragged_batch_must_fit_the_context_window(model):
    with pytest.raises(ValueError, match="must fit the context window"):
        generate(model, prompts_of_lengths([40, 3]), 10)
    with pytest.raises(ValueError, match="needs the KV cache"):
        generate(model, prompts_of_lengths([4, 3]), 2, use_cache=False)


def test_response_batches_sort_by_length_cap_memory_and_send_long_prompts_alone():
    cfg = GPTConfig(vocab_size=257, context_length=30, emb_dim=64, n_heads=2, n_layers=2)
    prompts = [[1] * n for n in (5, 28, 3, 9, 3, 7)]
    batches = response_batches(cfg, prompts, max_new_tokens=4, batch_size=2)
    assert batches == [[2, 4], [0, 5], [3], [1]]                  # 28 + 4 > 30: alone, last
    assert response_batches(cfg, prompts, 4) == [[2, 4, 0, 5, 3], [1]]


def test_test_set_responses_in_ragged_batches_equal_one_at_a_time(model):
    tokenizer = byte_tokenizer()
    cfg = GPTConfig(vocab_size=257, context_length=96, emb_dim=32, n_heads=4, n_layers=2)
    byte_model = GPTModel(cfg, seed=5)
    for p in byte_model.parameters():
        p.data *= 8.0
    entries = [{"instruction": word, "input": "x" * i, "output": ""}
               for i, word in enumerate(["Add", "Reverse", "Go", "Sort words"])]
    batched = generate_responses(byte_model, tokenizer, entries, "phi3", 12, progress=False)
    alone = [generate_responses(byte_model, tokenizer, [entry], "phi3", 12, batch_size=1, progress=False)[0]
             for entry in entries]
    assert batched == alone
    assert len(set(batched)) > 1


def test_decoding_products_split_over_their_rows_give_the_tokens_of_recomputing():
    """Wide enough (768 channels), one decoded token's MLP products are split over K across the threads
    (cpu/parallel.py:matmul); the greedy tokens stay those of the uncached path, which never splits so."""
    cfg = GPTConfig(vocab_size=257, context_length=64, emb_dim=768, n_heads=12, n_layers=1)
    assert parallel._count_matmul_slices(768, 768 * 3072) > 1 or parallel.num_threads() == 1
    model = GPTModel(cfg, seed=2)
    for name, p in model.named_parameters():
        if not name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            p.data *= 5.0
    idx = np.random.default_rng(0).integers(0, 257, size=(1, 10))
    cached = generate(model.eval(), idx, 40)
    np.testing.assert_array_equal(cached, generate(model, idx, 40, use_cache=False))
    assert len(set(cached[0, 10:].tolist())) > 10                   # real continuations, not one token
