"""Batched sampler: greedy and its limits, per-request seeds independent of the batch, frequencies
that follow the (truncated) softmax; parameter validation; stop strings."""

import pytest
import torch

from quad_engine.sampling import Sampler, SamplingParams, find_stop, sample_tokens

V = 1000


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return 3 * torch.randn(rows, V, generator=torch.Generator().manual_seed(seed))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_greedy_is_the_argmax():
    logits = random_logits(8)
    tokens = Sampler().sample(logits, [SamplingParams(temperature=0)] * 8)
    assert tokens.dtype == torch.long and tokens.device == logits.device
    assert torch.equal(tokens, logits.argmax(-1))
    # fp16 logits (what the model returns) take the same path
    assert torch.equal(Sampler().sample(logits.half(), [SamplingParams(temperature=0)] * 8),
                       logits.half().argmax(-1))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_1_and_a_tiny_top_p_are_greedy_at_any_temperature(temperature):
    torch.manual_seed(0)
    logits = random_logits(64)
    argmax = logits.argmax(-1)
    for p in (SamplingParams(temperature=temperature, top_k=1), SamplingParams(temperature=temperature, top_p=1e-6)):
        assert torch.equal(Sampler().sample(logits, [p] * 64), argmax)
    # and the same settings really do sample when not truncated (the test above can fail)
    assert not torch.equal(Sampler().sample(logits, [SamplingParams(temperature=temperature)] * 64), argmax)


def test_greedy_rows_stay_greedy_in_a_sampled_batch():
    logits = random_logits(6)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=2.0), SamplingParams(temperature=0),
              SamplingParams(temperature=5.0, top_k=50), SamplingParams(temperature=0, top_p=0.5),
              SamplingParams(temperature=1.0, top_p=0.9)]
    for _ in range(5):
        tokens = Sampler().sample(logits, params)
        assert tokens[[0, 2, 4]].tolist() == logits.argmax(-1)[[0, 2, 4]].tolist()


def test_a_seed_fixes_the_tokens_and_different_seeds_differ():
    flat = torch.zeros(1, V)  # every token equally likely: only the noise decides

    def draw(seed):
        gen = seeded(seed)
        return [Sampler().sample(flat, [SamplingParams(seed=seed)], [gen]).item() for _ in range(10)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    assert len(set(draw(7))) > 1  # the generator advances from step to step


def test_a_seeded_request_gets_the_same_tokens_alone_or_in_any_batch():
    logits = random_logits(5, seed=1)
    mine = SamplingParams(temperature=1.0, seed=7)
    alone_gen = seeded(7)
    alone = [Sampler().sample(logits[:1], [mine], [alone_gen]).item() for _ in range(20)]

    # The others truncate (so the batch takes the sorted path), are greedy, unseeded or seeded.
    others = [SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=0),
              SamplingParams(temperature=1.5, top_p=0.8), SamplingParams(temperature=1.0, seed=3)]
    for position in (0, 2, 4):
        params = others[:position] + [mine] + others[position:]
        rows = torch.cat([logits[1:position + 1], logits[:1], logits[position + 1:]])
        gens = [None, None, None, seeded(3)]
        gens = gens[:position] + [seeded(7)] + gens[position:]
        batched = [Sampler().sample(rows, params, gens)[position].item() for _ in range(20)]
        assert batched == alone


def empirical(logits: torch.Tensor, params: SamplingParams, draws: int = 4000) -> torch.Tensor:
    torch.manual_seed(0)
    tokens = Sampler().sample(logits.repeat(draws, 1), [params] * draws)
    return torch.bincount(tokens, minlength=logits.shape[-1]).double()


def assert_matches(counts: torch.Tensor, probs: torch.Tensor) -> None:
    """Pearson chi-square against the expected probabilities; tokens of probability 0 never drawn."""
    probs = probs.double()
    n = counts.sum()
    assert counts[probs == 0].sum() == 0
    support = probs > 0
    expected = n * probs[support]
    chi2 = ((counts[support] - expected) ** 2 / expected).sum().item()
    # 99.9th percentile of chi-square with up to 7 degrees of freedom is < 24.4
    assert chi2 < 24.4, f"chi-square {chi2:.1f}: counts {counts.tolist()} vs expected {expected.tolist()}"


LOGITS8 = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])


def test_frequencies_follow_the_softmax():
    assert_matches(empirical(LOGITS8, SamplingParams(temperature=1.0)), LOGITS8[0].softmax(-1))
    assert_matches(empirical(LOGITS8, SamplingParams(temperature=2.0)), (LOGITS8[0] / 2).softmax(-1))


def test_a_wrong_distribution_fails_the_frequency_check():
    with pytest.raises(AssertionError, match="chi-square"):
        assert_matches(empirical(LOGITS8, SamplingParams(temperature=1.0)), (LOGITS8[0] / 1.3).softmax(-1))


def test_frequencies_follow_the_truncated_softmax():
    probs = LOGITS8[0].softmax(-1)
    top3 = torch.zeros(8)
    top3[:3] = probs[:3] / probs[:3].sum()
    assert_matches(empirical(LOGITS8, SamplingParams(top_k=3)), top3)
    # top-p: the smallest prefix whose mass reaches p (0.40 + 0.25 < 0.7 <= 0.40 + 0.25 + 0.15)
    assert_matches(empirical(LOGITS8, SamplingParams(top_p=0.7)), top3)
    # top-k then top-p, measured on the top-k distribution: of the top 3 (0.51, 0.31, 0.19), 0.75 keeps 2
    # (on the full distribution it would keep 3)
    top2 = torch.zeros(8)
    top2[:2] = probs[:2] / probs[:2].sum()
    assert_matches(empirical(LOGITS8, SamplingParams(top_k=3, top_p=0.75)), top2)


def test_sample_tokens_takes_per_row_tensors():
    logits = random_logits(3)
    temps = torch.tensor([0.0, 1.0, 1.0])
    top_ks = torch.tensor([V, 1, V])
    top_ps = torch.tensor([1.0, 1.0, 1e-6])
    assert torch.equal(sample_tokens(logits, temps, top_ks, top_ps), logits.argmax(-1))


@pytest.mark.parametrize("kwargs,field", [
    ({"temperature": -0.5}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_k": 0}, "top_k"), ({"top_k": -2}, "top_k"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.01}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"seed": -1}, "seed"), ({"stop": "###"}, "stop"),
])
def test_invalid_values_raise_a_one_line_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} ") as err:
        SamplingParams(**kwargs)
    assert "\n" not in str(err.value)


def test_valid_edges_are_accepted():
    SamplingParams(temperature=0, top_k=-1, top_p=1.0, max_tokens=1, seed=0, stop=["\n"], stop_token_ids=[2])
    SamplingParams(top_k=1, top_p=1e-9)


def test_find_stop_returns_where_the_earliest_stop_string_starts():
    assert find_stop("hello world. Bye", ["Bye", "."]) == 11
    assert find_stop("a</s>b<|end|>", ["<|end|>", "</s>"]) == 1
    assert find_stop("hello", ["x"]) is None
    assert find_stop("hello", []) is None
    assert find_stop("hello", [""]) is None  # an empty stop string never matches
    assert find_stop("stop", ["stop"]) == 0


@pytest.mark.parametrize("vocab", [128256, 151936, 49152, 1000])
def test_chunked_argmax_returns_the_first_maximum(vocab):
    """Every form argmax_rows may take gives argmax's indices exactly: ties (few distinct values)
    resolve to the first maximum, a NaN wins as in argmax, maxima at either end of a row and on
    both sides of a chunk boundary are found."""
    from quad_engine.sampling import argmax_chunks, argmax_rows
    chunks = argmax_chunks(vocab)
    assert chunks and all(vocab % d == 0 and vocab // d > 1 for d in chunks)
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randint(0, 4, (6, vocab), generator=g).float()       # many tied maxima a row
    logits[1] = torch.randn(vocab, generator=g)
    logits[2, vocab // 3] = float("nan")
    logits[2, vocab // 2] = float("nan")
    logits[3, -1] = 10.0
    logits[4, 0] = 10.0
    for d in chunks:
        row = logits[5].clone()
        logits[5, d - 1] = logits[5, d] = 10.0                            # a tie across a chunk boundary
        got = argmax_rows(logits, d)
        assert torch.equal(got, logits.argmax(-1)), (d, got, logits.argmax(-1))
        assert got[3] == vocab - 1 and got[4] == 0 and got[5] == d - 1
        logits[5] = row
    assert torch.equal(argmax_rows(logits, None), logits.argmax(-1))


def test_precomputed_greedy_tokens_are_used_for_greedy_rows():
    """A decode step's graph hands the sampler its argmax: all-greedy batches return it, and mixed
    batches take it for their temperature-0 rows."""
    logits = torch.randn(3, 50)
    marker = torch.tensor([7, 8, 9])                                       # not the argmax: shows it was used
    assert torch.equal(Sampler().sample(logits, [SamplingParams(temperature=0)] * 3, greedy=marker), marker)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=0)]
    gens = [None, torch.Generator().manual_seed(1), None]
    tokens = Sampler().sample(logits, params, gens, greedy=marker)
    assert tokens[0] == 7 and tokens[2] == 9
