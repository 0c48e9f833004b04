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


def test_focal_reweighting_follows_its_formula():
    g = torch.Generator().manual_seed(3)
    q, p = F.normalize(torch.randn(6, 16, generator=g), dim=-1), F.normalize(torch.randn(10, 16, generator=g), dim=-1)
    log_p = F.log_softmax(q @ p.T / 0.05, dim=-1).diagonal()
    want = ((1 - log_p.exp()) ** 0.5 * -log_p).mean()
    assert torch.allclose(info_nce(q, p, 0.05, focal_gamma=0.5), want, atol=1e-6)
    assert info_nce(q, p, 0.05, focal_gamma=0.5) < info_nce(q, p, 0.05)  # weights are < 1
    assert torch.allclose(info_nce(q, p, 0.05, focal_gamma=0.0), info_nce(q, p, 0.05))


def test_extra_negatives_enter_only_their_own_querys_denominator():
    g = torch.Generator().manual_seed(4)
    q, p = F.normalize(torch.randn(3, 8, generator=g), dim=-1), F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    extra = torch.zeros(3, 1, 8)
    extra[1, 0] = q[1]  # a perfect "negative" for query 1 only
    logits = q @ p.T / 0.05
    per_query = F.cross_entropy(logits, torch.arange(3), reduction="none")
    with_extra = F.cross_entropy(
        torch.cat([logits, (q * extra[:, 0]).sum(-1, keepdim=True) / 0.05], 1), torch.arange(3), reduction="none"
    )
    assert torch.allclose(info_nce(q, p, 0.05, extra_negatives=extra), with_extra.mean())
    assert torch.allclose(with_extra[[0, 2]], per_query[[0, 2]], atol=1e-3)  # zero vectors barely count
    assert with_extra[1] > per_query[1] + 1


def test_mixed_negatives_are_unit_convex_combinations_of_two_own_negatives():
    from kalm.losses import mix_hard_negatives

    g = torch.Generator().manual_seed(5)
    negs = F.normalize(torch.randn(4, 3, 8, generator=g), dim=-1).requires_grad_()
    mixed = mix_hard_negatives(negs, 5, generator=torch.Generator().manual_seed(0))
    assert mixed.shape == (4, 5, 8) and not mixed.requires_grad
    assert torch.allclose(mixed.norm(dim=-1), torch.ones(4, 5), atol=1e-5)
    for i in range(4):
        basis = negs[i].detach()  # each synthetic point lies in the span of query i's own negatives
        coef = torch.linalg.lstsq(basis.T, mixed[i].T).solution
        assert torch.allclose(basis.T @ coef, mixed[i].T, atol=1e-4)
        assert ((coef > -1e-4).sum(0) == 3).all() and ((coef.abs() > 1e-4).sum(0) == 2).all()
    again = mix_hard_negatives(negs, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mixed, again)
    assert mix_hard_negatives(negs[:, :1], 5).shape == (4, 0, 8)


def test_focal_loss_has_finite_gradients_when_an_example_is_solved():
    q = torch.eye(2, 4, requires_grad=True)
    p = torch.eye(2, 4)
    loss = info_nce(F.normalize(q, dim=-1), p, 0.001, focal_gamma=0.5)  # p_i rounds to 1.0
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all()
