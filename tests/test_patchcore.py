"""PatchCore and its greedy coreset: the pruned k-center search makes the naive algorithm's choices,
the pure pieces (patch features, nearest distances, the paper's re-weighting, the smoothed map) match
direct computations, a tiny fit → predict → reload works on random weights; on MVTec bottle (when the
shared data is there) the coreset of 10 % of its patches takes at most 60 s and covers them better
than a random bank of the same size."""

import math
import time
from pathlib import Path

import pytest
import torch

from adnb.coreset import coreset_indices, greedy_coreset, random_projection
from adnb.methods.base import build_detector
from adnb.methods.patchcore import (PatchCoreConfig, fit, memory_bank, nearest, patch_features, resolve,
                                    reweighted_score, smooth_map, variant)
from adnb.runtime.errors import AdnbError

BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"
TINY = PatchCoreConfig(image_size=32, weights="random", coreset=0.25)


def naive_greedy(points: torch.Tensor, k: int, start: int) -> list[int]:
    """Greedy k-center written the obvious way, in float64: one full distance column per step."""
    x = points.double()
    d = torch.full((len(x),), math.inf, dtype=torch.float64)
    kept, i = [start], start
    while len(kept) < k:
        d = torch.minimum(d, (x - x[i]).square().sum(dim=1))
        i = int(d.argmax())
        kept.append(i)
    return kept


def clustered(sizes: list[int], dim: int, seed: int, spread: float = 6.0) -> torch.Tensor:
    """Gaussian clusters of the given sizes: the case the pruning skips most rows on."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(1, dim, generator=g) * spread + torch.randn(n, dim, generator=g) for n in sizes])


@pytest.mark.parametrize("points, k, start", [
    (torch.randn(400, 16, generator=torch.Generator().manual_seed(3)), 60, 11),
    (clustered([300, 200, 100, 50, 20, 5], 8, seed=0), 200, 3),
    (clustered([300, 200, 100, 50, 20, 5], 8, seed=2), 675, 0),  # every row, to the last
    (torch.cat([torch.ones(5, 4), torch.zeros(5, 4), torch.randn(30, 4, generator=torch.Generator().manual_seed(0))]),
     32, 0),  # repeated rows: every distinct row, each once
])
def test_pruned_greedy_coreset_makes_the_naive_choices(points, k, start):
    assert greedy_coreset(points, k, start=start).tolist() == naive_greedy(points, k, start)


def test_coreset_is_seeded_distinct_and_covers_better_than_a_random_draw():
    clusters = torch.randn(6, 24, generator=torch.Generator().manual_seed(0)) * 5
    sizes = [500, 300, 100, 40, 8, 2]  # rare clusters, which a random draw of 30 likely misses
    points = torch.cat([c + torch.randn(n, 24, generator=torch.Generator().manual_seed(i))
                        for i, (c, n) in enumerate(zip(clusters, sizes))])
    a, b = coreset_indices(points, 30, projection=8, seed=1), coreset_indices(points, 30, projection=8, seed=1)
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 30
    assert coreset_indices(points, 30, projection=8, seed=2).tolist() != a.tolist()

    def radius(kept: torch.Tensor) -> float:
        return float(nearest(points, points[kept])[0].max())

    draws = [radius(torch.randperm(len(points), generator=torch.Generator().manual_seed(s))[:30]) for s in range(5)]
    assert radius(a) < min(draws)


def test_random_projection_keeps_small_inputs_and_roughly_keeps_distances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g)
    assert torch.equal(random_projection(x, 16, g), x)
    x = torch.randn(50, 1000, generator=g)
    y = random_projection(x, 256, g)
    ratio = torch.pdist(y) / torch.pdist(x)
    assert y.shape == (50, 256) and 0.75 < float(ratio.min()) and float(ratio.max()) < 1.25


def test_greedy_coreset_refuses_impossible_sizes():
    with pytest.raises(AdnbError, match="coreset of 11 rows out of 10"):
        greedy_coreset(torch.randn(10, 3), 11)
    with pytest.raises(AdnbError, match="start row"):
        greedy_coreset(torch.randn(10, 3), 2, start=10)


def test_patch_features_average_the_neighbourhood_and_align_the_stages():
    fine = torch.arange(16.0).view(1, 1, 4, 4)
    coarse = torch.ones(1, 2, 2, 2)
    out = patch_features([fine, coarse], pool=3)
    assert out.shape == (1, 3, 4, 4)
    assert out[0, 0, 1, 1] == fine[0, 0, :3, :3].mean()
    assert out[0, 0, 0, 0] == fine[0, 0, :2, :2].sum() / 9  # zero padding counts, as in the official code
    assert torch.allclose(out[0, 1:], torch.full((2, 4, 4), 4 / 9))  # each 2×2 position sees four ones of nine
    assert torch.equal(patch_features([fine, coarse], pool=1, upsample="nearest")[0, 1:], torch.ones(2, 4, 4))


def test_nearest_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(50, 6, generator=g), torch.randn(40, 6, generator=g)
    distances, index = nearest(queries, bank, chunk=7)
    full = ((queries[:, None] - bank[None]) ** 2).sum(-1).sqrt()
    assert torch.allclose(distances, full.min(dim=1).values, atol=1e-5)
    assert torch.equal(index, full.argmin(dim=1))


def test_reweighting_is_the_papers_formula():
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(30, 4, generator=g)
    m_test = torch.randn(2, 4, generator=g) * 0.5
    s_star, idx = nearest(m_test, bank)
    m_star = bank[idx]
    got = reweighted_score(s_star, m_test, m_star, bank, neighbours=5)
    for j in range(2):
        support = ((bank - m_star[j]) ** 2).sum(1).argsort()[:5]  # N_b(m*), m* itself first
        assert support[0] == idx[j]
        weight = 1 - math.exp(float(s_star[j])) / sum(math.exp(float((m_test[j] - bank[m]).norm())) for m in support)
        assert float(got[j]) == pytest.approx(weight * float(s_star[j]), rel=1e-5)
        # m* is m_test*'s nearest bank vector, so every term is at least exp(s*): the weight is in [1 − 1/b, 1)
        assert (1 - 1 / 5) * float(s_star[j]) - 1e-6 <= float(got[j]) < float(s_star[j])
    assert torch.equal(reweighted_score(s_star, m_test, m_star, bank, neighbours=1), s_star)


def test_smooth_map_upsamples_then_blurs():
    scores = torch.zeros(1, 4, 4)
    scores[0, 1, 1] = 1.0
    plain = smooth_map(scores, 32, sigma=0)
    blurred = smooth_map(scores, 32, sigma=2)
    assert plain.shape == blurred.shape == (1, 32, 32)
    assert blurred.max() < plain.max() and blurred.sum() == pytest.approx(float(plain.sum()), rel=0.05)


def test_config_is_checked_and_the_random_bank_is_a_variant():
    with pytest.raises(AdnbError, match="sampler"):
        PatchCoreConfig(sampler="kmeans")
    with pytest.raises(AdnbError, match="coreset"):
        PatchCoreConfig(coreset=0)
    assert variant(PatchCoreConfig(sampler="random")) == "random" and variant(PatchCoreConfig()) == ""
    assert resolve({"weights": "random", "sampler": "random", "stages": [2, 3]}).stages == (2, 3)


def test_memory_bank_keeps_the_share_the_config_asks_for():
    vectors = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    for sampler in ("greedy", "random"):
        bank = memory_bank(vectors, PatchCoreConfig(coreset=0.1, sampler=sampler, projection=4))
        assert bank.shape == (20, 5) and len(torch.unique(bank, dim=0)) == 20
    assert memory_bank(vectors, PatchCoreConfig(coreset=1.0)) is vectors


def test_tiny_fit_predict_and_reload():
    g = torch.Generator().manual_seed(0)
    images = 0.4 + 0.1 * torch.rand(6, 3, 32, 32, generator=g)
    detector = fit(TINY, images)
    n_patches = 6 * 4 * 4  # stride 8 at 32²
    assert detector.bank.shape == (round(0.25 * n_patches), 40 + 112)
    assert set(detector.fit_info["stage_seconds"]) == {"features", "memory_bank"}
    broken = images[:2].clone()
    broken[:, :, 8:20, 8:20] = 1.0
    pred = detector.predict(torch.cat([images[:2], broken]))
    assert pred.maps.shape == (4, 32, 32) and (pred.scores >= 0).all()
    assert pred.scores[2:].min() > pred.scores[:2].max()
    again = build_detector("patchcore", TINY).load_state(detector.state_dict()).eval()
    assert torch.allclose(again.predict(broken).scores, pred.scores[2:])


@pytest.mark.realdata
@pytest.mark.slow
def test_bottle_coreset_of_ten_percent_within_a_minute():
    if not BOTTLE.is_dir():
        pytest.skip("../shared/data/mvtec_ad/bottle is absent")
    from adnb.data import load_category
    from adnb.methods.patchcore import PatchCore

    config = resolve({"image_size": 224})
    detector = PatchCore(config)
    detector.backbone.load_weights(config.weights)
    images = load_category(BOTTLE.parent, "bottle").load("train", 224).float_images()
    vectors = torch.cat([detector.patches(b).permute(0, 2, 3, 1).flatten(0, 2) for b in images.split(16)])
    assert len(vectors) > 150_000
    start = time.perf_counter()
    bank = memory_bank(vectors, config)
    seconds = time.perf_counter() - start
    assert len(bank) == round(0.1 * len(vectors))
    assert seconds <= 60, f"greedy coreset of {len(bank):,} out of {len(vectors):,} patches took {seconds:.0f} s"
    random_bank = memory_bank(vectors, PatchCoreConfig(sampler="random"))
    sample = vectors[torch.randperm(len(vectors), generator=torch.Generator().manual_seed(1))[:20_000]]
    assert nearest(sample, bank)[0].max() < nearest(sample, random_bank)[0].max()
