"""InfoNCE equals sentence-transformers' MultipleNegativesRankingLoss with hard negatives."""

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

from kalm.losses import info_nce


@pytest.mark.parametrize("batch, n_neg, temperature", [(4, 0, 0.05), (8, 3, 0.01), (5, 7, 0.02)])
def test_info_nce_matches_mnrl(batch, n_neg, temperature):
    g = torch.Generator().manual_seed(batch * 10 + n_neg)
    q = F.normalize(torch.randn(batch, 16, generator=g), dim=-1)
    pos = F.normalize(torch.randn(batch, 16, generator=g), dim=-1)
    negs = [F.normalize(torch.randn(batch, 16, generator=g), dim=-1) for _ in range(n_neg)]
    mnrl = MultipleNegativesRankingLoss(model=None, scale=1 / temperature)
    reference = mnrl.compute_loss_from_embeddings([q, pos, *negs], labels=None)
    # kalm's layout: all positives, then every record's negatives (record-major order)
    passages = torch.cat([pos] + [torch.stack([n[i] for n in negs]) for i in range(batch)]) if n_neg else pos
    ours = info_nce(q, passages, temperature)
    assert torch.allclose(ours, reference, atol=1e-5), (ours, reference)


def test_info_nce_prefers_the_right_positive():
    q = F.normalize(torch.eye(3, 8), dim=-1)
    good = info_nce(q, q.clone(), 0.05)
    bad = info_nce(q, q.roll(1, dims=0), 0.05)
    assert good < 0.01 < bad


def test_matryoshka_sums_weighted_prefix_losses():
    from kalm.losses import matryoshka

    g = torch.Generator().manual_seed(0)
    q, p = F.normalize(torch.randn(4, 32, generator=g), dim=-1), F.normalize(torch.randn(6, 32, generator=g), dim=-1)
    nce = lambda a, b: info_nce(a, b, 0.05)  # noqa: E731
    got = matryoshka(nce, q, p, [32, 8], [1.0, 0.5])
    want = nce(q, p) + 0.5 * nce(F.normalize(q[:, :8], dim=-1), F.normalize(p[:, :8], dim=-1))
    assert torch.allclose(got, want)
    with pytest.raises(ValueError):
        matryoshka(nce, q, p, [64], [1.0])
