import torch

from baobab.serve.sampler import argmax_rows, sample_rows
from baobab.serve.types import SamplingParams


def test_argmax_rows_equals_torch_argmax_and_takes_the_first_of_ties():
    logits = torch.randn(16, 4096, generator=torch.Generator().manual_seed(0))
    logits[3, 10] = logits[3, 20] = logits[3].max() + 1.0  # a tie: the first index wins
    logits[5] = 0.0  # a whole row tied
    assert argmax_rows(logits) == logits.argmax(-1).tolist()
    assert argmax_rows(logits)[3] == 10 and argmax_rows(logits)[5] == 0


def test_greedy_rows_beside_sampled_rows_take_the_argmax():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=5)] * 2
    gens = [torch.Generator().manual_seed(5) for _ in range(3)]
    tokens = sample_rows(logits, params[:3], gens)
    assert all(isinstance(t, int) for t in tokens)
    assert [tokens[0], tokens[2]] == logits[[0, 2]].argmax(-1).tolist()
