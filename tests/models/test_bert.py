"""BERT: padding mask, limits, tied MLM decoder, determinism."""

import pytest
import torch

from baobab.models import Bert, build_model, count_params
from baobab.models.common import materialize

TINY = dict(vocab_size=50, n_layer=2, n_head=2, d_model=32, ffn_hidden=64, max_seq_len=16)


def tiny(**overrides) -> Bert:
    return build_model("bert-tiny", **{**TINY, **overrides})


def test_padding_is_masked_out() -> None:
    torch.manual_seed(0)
    model = tiny().eval()
    idx = torch.randint(0, 50, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 6:] = 0  # first row: 6 real tokens, 4 pads
    changed = idx.clone()
    changed[0, 6:] = (changed[0, 6:] + 7) % 50
    a, b = model(idx, mask), model(changed, mask)
    torch.testing.assert_close(a[0, :6], b[0, :6])
    torch.testing.assert_close(a[1], b[1])
    # Without the mask the pads do leak into the kept positions.
    assert not torch.allclose(model(idx)[0, :6], model(changed)[0, :6])
    assert model(idx, mask.bool()).shape == (2, 10, 50)


def test_bidirectional_and_token_types() -> None:
    torch.manual_seed(0)
    model = tiny().eval()
    idx = torch.randint(0, 50, (1, 8))
    changed = idx.clone()
    changed[0, 7] = (changed[0, 7] + 1) % 50
    assert not torch.allclose(model(idx)[0, 0], model(changed)[0, 0])  # sees the future
    types = torch.zeros(1, 8, dtype=torch.long)
    torch.testing.assert_close(model(idx, token_type_ids=types), model(idx))
    types[0, 4:] = 1
    assert not torch.allclose(model(idx, token_type_ids=types), model(idx))


def test_layout_tie_and_limits() -> None:
    torch.manual_seed(0)
    model = tiny()
    assert list(model.layers) == ["0", "1"]
    assert model.mlm_head.decoder.weight is model.word_embeddings.weight
    assert model.mlm_head.decoder.bias.shape == (50,)
    assert model.layers["0"].attention.wq.bias is not None
    with pytest.raises(ValueError, match="sequence length 17 exceeds BertConfig.max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    meta = build_model("bert-tiny", device="meta", **TINY)
    materialize(meta, seed=5, device="cpu")
    direct = build_model("bert-tiny", seed=5, **TINY)
    for (name, p), q in zip(direct.state_dict().items(), meta.state_dict().values()):
        assert torch.equal(p, q), name
    assert meta.mlm_head.decoder.weight is meta.word_embeddings.weight
    assert count_params(meta) == count_params(model)
