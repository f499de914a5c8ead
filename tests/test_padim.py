"""PaDiM: the per-position Gaussians against NumPy and scikit-learn (covariance, Ledoit–Wolf), the
Mahalanobis distance against SciPy, and a tiny fit → predict → reload on random weights."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from sklearn.covariance import ledoit_wolf as sklearn_ledoit_wolf

from adnb.methods.base import build_detector
from adnb.methods.padim import PaDiMConfig, fit, gaussian_moments, gaussians, ledoit_wolf, mahalanobis
from adnb.runtime.errors import AdnbError

TINY = PaDiMConfig(image_size=32, weights="random", n_features=20)


def samples(p: int, n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(p, n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
            + torch.randn(p, 1, d, generator=g, dtype=torch.float64))


def test_moments_are_numpys_mean_and_unbiased_covariance():
    x = samples(3, 25, 6)
    mu, cov = gaussian_moments(x)
    for j in range(3):
        np.testing.assert_allclose(mu[j].numpy(), x[j].numpy().mean(axis=0), atol=1e-12)
        np.testing.assert_allclose(cov[j].numpy(), np.cov(x[j].numpy(), rowvar=False), atol=1e-10)


@pytest.mark.parametrize("n", [40, 5])  # more samples than dimensions, and fewer
def test_ledoit_wolf_is_scikit_learns(n):
    x = samples(3, n, 8, seed=n)
    cov, rho = ledoit_wolf(x)
    for j in range(3):
        want, want_rho = sklearn_ledoit_wolf(x[j].numpy())
        np.testing.assert_allclose(cov[j].numpy(), want, rtol=1e-9, atol=1e-12)
        assert float(rho[j]) == pytest.approx(want_rho, rel=1e-9)


def test_mahalanobis_is_scipys():
    x = samples(2, 30, 5)
    mu, inverse, _ = gaussians(x, PaDiMConfig())
    queries = samples(2, 4, 5, seed=7).transpose(0, 1)  # (B=4, P=2, d)
    got = mahalanobis(queries, mu, inverse)
    for b in range(4):
        for p in range(2):
            want = scipy_mahalanobis(queries[b, p].numpy(), mu[p].numpy(), inverse[p].numpy())
            assert float(got[b, p]) == pytest.approx(want, rel=1e-9)


def test_identity_shrinkage_adds_epsilon_and_keeps_few_samples_invertible():
    x = samples(1, 4, 10)  # 4 samples in 10 dimensions: S is singular
    _, inverse, _ = gaussians(x, PaDiMConfig(epsilon=0.01))
    _, cov = gaussian_moments(x)
    np.testing.assert_allclose(torch.linalg.inv(inverse[0]).numpy(), (cov[0] + 0.01 * torch.eye(10)).numpy(), atol=1e-8)
    _, shrunk, facts = gaussians(x, PaDiMConfig(shrinkage="ledoit_wolf"))
    assert torch.isfinite(shrunk).all() and 0 < facts["ledoit_wolf_rho_mean"] <= 1


def test_config_is_checked():
    with pytest.raises(AdnbError, match="shrinkage"):
        PaDiMConfig(shrinkage="oas")
    with pytest.raises(AdnbError, match="n_features = 500"):
        build_detector("padim", PaDiMConfig(image_size=32, weights="random", n_features=500))


def test_tiny_fit_predict_and_reload():
    g = torch.Generator().manual_seed(0)
    images = 0.4 + 0.1 * torch.rand(8, 3, 32, 32, generator=g)
    detector = fit(TINY, images)
    assert detector.mean.shape == (16, 20) and detector.inverse.shape == (16, 20, 20)  # 4×4 positions at stride 8
    assert len(set(detector.index.tolist())) == 20
    assert set(detector.fit_info["stage_seconds"]) == {"features", "gaussians"}
    broken = images[:2].clone()
    broken[:, :, 8:20, 8:20] = 1.0
    pred = detector.predict(torch.cat([images[:2], broken]))
    assert pred.maps.shape == (4, 32, 32) and torch.equal(pred.scores, pred.maps.flatten(1).amax(dim=1))
    assert pred.scores[2:].min() > pred.scores[:2].max()
    again = build_detector("padim", TINY).load_state(detector.state_dict()).eval()
    assert torch.allclose(again.predict(broken).scores, pred.scores[2:])
    with pytest.raises(AdnbError, match="at least 2"):
        fit(TINY, images[:1])
