"""Explanations of language models: the axioms of the attributions, and the insides of a GPT.

Numerics, not intuition: integrated gradients are complete (their scores sum to
f(input) - f(baseline)), a token the causal mask hides from the target gets exactly zero,
recomputed attention maps reproduce the attention module's output, and the logit lens's
last layer is the model's own logits.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from baobab.data import byte_tokenizer
from baobab.explain import ExplainError, explain, planned_units
from baobab.explain.inside import attention_weights, lens_logits
from baobab.explain.text import EMBEDDINGS, Objective
from baobab.models import GPTConfig, build_model


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def _model(name: str, **overrides):
    return build_model(name, seed=0, vocab_size=512, **overrides).double().eval()


def _value_at(model, family: str, ids: list[int], scored, embeds: torch.Tensor) -> float:
    """The objective at given context embeddings, computed outside explain()."""
    embedding = model.get_submodule(EMBEDDINGS[family])
    objective = Objective(model, embedding, [(torch.tensor(ids), scored, 1.0)], lambda n: None)
    with torch.no_grad():
        return float(objective(embeds))


@pytest.mark.parametrize(
    ("name", "prompt"), [("gpt-nano", "the cat sat"), ("bert-tiny", "the <|mask|>at")]
)
def test_integrated_gradients_are_complete(tokenizer, name: str, prompt: str) -> None:
    model = _model(name)
    family = "gpt" if name.startswith("gpt") else "bert"
    result = explain(model, tokenizer, prompt=prompt, methods="ig", ig_steps=512, max_delta=1e-5)
    step = result.steps[0]
    (ig,) = step.attributions
    assert ig.method == "ig" and len(ig.scores) == len(step.context_ids)
    scored = [(step.position, step.target_ids[0])]
    embedding = model.get_submodule(EMBEDDINGS[family])
    with torch.no_grad():
        embeds = embedding(torch.tensor(step.context_ids)[None])
    f_input = _value_at(model, family, step.context_ids, scored, embeds)
    f_baseline = _value_at(model, family, step.context_ids, scored, torch.zeros_like(embeds))
    assert f_input == pytest.approx(step.logprob, abs=1e-12)
    assert sum(ig.scores) == pytest.approx(f_input - f_baseline, abs=1e-4)
    assert abs(ig.delta) < 1e-4


def test_a_token_after_the_target_gets_exactly_zero(tokenizer) -> None:
    """Explain the prediction at position 3 of a 9-token context: positions 4.. are after
    it under the causal mask, so every method gives them exactly 0."""
    model = _model("gpt-nano")
    ids = tokenizer.encode("abcdefghi")
    embedding = model.get_submodule("tok_embeddings")
    objective = Objective(
        model, embedding, [(torch.tensor(ids), [(3, ids[4])], 1.0)], lambda n: None
    )
    from baobab.explain.text import attribute

    with torch.no_grad():
        embeds = embedding(torch.tensor(ids)[None])
    for attribution in attribute(
        objective, embeds, ["ig", "grad_x_input", "occlusion"], 32, 1.0, 8
    ):
        assert all(score == 0.0 for score in attribution.scores[4:]), attribution.method
        assert any(score != 0.0 for score in attribution.scores[:4]), attribution.method


def test_contrast_explains_the_difference_of_log_probabilities(tokenizer) -> None:
    model = _model("gpt-nano")
    result = explain(model, tokenizer, prompt="to be or", target=" not", contrast=" to",
                     ig_steps=512, max_delta=1e-5)  # fmt: skip
    step = result.steps[0]
    assert step.contrast == " to" and step.contrast_logprob is not None
    assert step.value == pytest.approx(step.logprob - step.contrast_logprob)
    ids = torch.tensor(tokenizer.encode("to be or not"))[None]
    with torch.no_grad():
        logp = F.log_softmax(model(ids).double(), -1)[0]
    target = sum(float(logp[7 + i, ids[0, 8 + i]]) for i in range(4))  # " not": 4 bytes
    assert step.logprob == pytest.approx(target, abs=1e-9)
    baseline = step.value - sum(step.attributions[0].scores)  # f(0) by completeness
    assert abs(step.attributions[0].delta) < 1e-4
    assert baseline != pytest.approx(step.value)


def test_each_generated_token_is_explained_in_turn(tokenizer) -> None:
    model = _model("lstm-tiny")
    result = explain(model, tokenizer, prompt="abc", max_tokens=3, methods="grad_x_input")
    assert [len(s.context_ids) for s in result.steps] == [3, 4, 5]
    assert [s.context_ids[3:] for s in result.steps][1:] == [
        result.steps[0].target_ids,
        result.steps[0].target_ids + result.steps[1].target_ids,
    ]
    assert result.attention is None and result.logit_lens is None  # an LSTM has neither
    completion = explain(model, tokenizer, prompt="abc", completion="xy", methods="occlusion")
    assert [s.target for s in completion.steps] == ["x", "y"]


def test_attention_maps_reproduce_the_attention_output_for_gqa() -> None:
    cfg = GPTConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, ffn_hidden=48,
                    max_seq_len=16)  # fmt: skip
    model = build_model(cfg, seed=0).eval()
    ids = torch.randint(0, 64, (1, 11), generator=torch.Generator().manual_seed(1))
    maps = attention_weights(model, ids)  # (L, H, T, T)
    assert maps.shape == (2, 4, 11, 11)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 4, 11), atol=1e-6, rtol=0)
    assert (maps.triu(1) == 0).all()
    values, outputs = [], []
    handles = []
    for block in model.layers.values():
        attn = block.attention
        handles.append(attn.wv.register_forward_hook(lambda m, a, out: values.append(out)))
        handles.append(attn.wo.register_forward_pre_hook(lambda m, a: outputs.append(a[0])))
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    for layer in range(2):
        v = values[layer].view(1, 11, 2, cfg.head_dim).transpose(1, 2)  # (1, Hkv, T, D)
        v = v.repeat_interleave(2, dim=1)  # (1, H, T, D)
        y = (maps[layer][None] @ v).transpose(1, 2).reshape(1, 11, -1)  # (1, T, H * D)
        torch.testing.assert_close(y, outputs[layer], atol=1e-5, rtol=0)


def test_the_logit_lens_last_layer_is_the_models_logits(tokenizer) -> None:
    model = build_model("gpt-nano", seed=0, vocab_size=512).eval()
    ids = torch.tensor(tokenizer.encode("hello there"))[None]
    lens, logits = lens_logits(model, ids)
    assert lens.shape == (2, 11, 512)
    assert torch.equal(lens[-1], logits[0])
    result = explain(model, tokenizer, prompt="hello there", methods="grad_x_input", top_k=3)
    assert result.logit_lens.top_ids[-1][-1][0] == result.steps[0].target_ids[0]  # greedy


def test_bad_requests_get_one_sentence(tokenizer) -> None:
    gpt, bert = _model("gpt-nano"), _model("bert-tiny")
    cases = [
        (gpt, dict(prompt="abc", methods="ig,shap"), "unknown attribution method shap"),
        (gpt, dict(prompt="abc", target="x", completion="y"), "give one of"),
        (gpt, dict(prompt="", target="x"), "prompt is empty"),
        (gpt, dict(prompt="abc", ig_steps=1, max_delta=1e-9), "raise ig_steps"),
        (gpt, dict(prompt="a" * 300), "reads at most 256"),
        (bert, dict(prompt="no mask here"), "needs the mask token"),
        (gpt, dict(inputs=torch.zeros(1, 3)), "from a prompt"),
    ]
    for model, kwargs, message in cases:
        with pytest.raises(ExplainError, match=message):
            explain(model, tokenizer, **kwargs)


def test_progress_counts_integration_steps_of_every_token(tokenizer) -> None:
    model = _model("gpt-nano")
    done = []
    explain(model, tokenizer, prompt="abcd", completion="ef", methods="ig,grad_x_input,occlusion",
            ig_steps=10, internal_batch_size=4, max_delta=1.0, progress=done.append)  # fmt: skip
    methods = ["ig", "grad_x_input", "occlusion"]
    assert sum(done) <= planned_units(methods, 10, [4, 5])  # contexts "abcd", "abcde"
    assert sum(done) >= 2 * (1 + 5 + 1)  # each token: grad x input, occlusion, some of IG
    assert max(done) <= 4  # Captum's internal batches: a pause point at least every 4 rows
