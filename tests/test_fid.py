import numpy as np
import torch
import pytest
from cleanfid.fid import fid_from_feats
from scipy import linalg

from conftest import PALETTE, fill50k_dataset
from controlnet_lab.data.fill50k import read_index
from controlnet_lab.data.samples import load_rgb
from controlnet_lab.metrics.domain_features import domain_net
from controlnet_lab.metrics.fid import fid, inception_extractor


def _reference_frechet(mu1, s1, mu2, s2):
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_matches_the_closed_form_on_gaussians():
    rng = np.random.default_rng(0)
    dim = 8
    a = rng.normal(size=(dim, dim))
    s1 = a @ a.T / dim + np.eye(dim)
    s2 = np.diag(rng.uniform(0.5, 2.0, dim))
    mu1, mu2 = np.zeros(dim), np.full(dim, 0.5)
    feats1 = rng.multivariate_normal(mu1, s1, size=20000)
    feats2 = rng.multivariate_normal(mu2, s2, size=20000)
    exact = _reference_frechet(mu1, s1, mu2, s2)
    empirical = _reference_frechet(feats1.mean(0), np.cov(feats1, rowvar=False), feats2.mean(0), np.cov(feats2, rowvar=False))
    assert fid_from_feats(feats1, feats2) == pytest.approx(empirical, rel=1e-6)
    assert fid_from_feats(feats1, feats2) == pytest.approx(exact, rel=0.05)
    assert fid_from_feats(feats1, feats1) == pytest.approx(0.0, abs=1e-6)


def test_domain_fid_is_zero_on_itself_and_grows_with_distortion(tiny_data, tmp_path):
    dataset = fill50k_dataset(tiny_data, 16)
    net = domain_net(dataset, list(PALETTE), tmp_path, steps=60)
    images = np.stack([load_rgb(r.target, 16) for r in read_index(tiny_data)])
    extractor = net.clean_fid_extractor()
    assert fid(images, images, extractor) == pytest.approx(0.0, abs=1e-3)
    rng = np.random.default_rng(0)
    scores = []
    for sigma in (20, 120):
        noisy = np.clip(images + rng.normal(0, sigma, images.shape), 0, 255).astype(np.uint8)
        scores.append(fid(noisy, images, extractor))
    assert 1e-3 < scores[0] < scores[1], scores
    # Cached: the second call loads the same weights.
    again = domain_net(dataset, list(PALETTE), tmp_path, steps=60)
    assert all((p == q).all() for p, q in zip(net.state_dict().values(), again.state_dict().values()))


@pytest.mark.bad_input
def test_missing_inception_weights_name_the_file(tmp_path, monkeypatch):
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt"):
        inception_extractor(tmp_path / "weights")
    assert not (tmp_path / "weights" / "inception-2015-12-05.pt").exists()


def test_fids_run_on_the_suites_device(monkeypatch):
    """Inception (and domain) FID go to clean-fid on the device the suite's extractors were moved to, not always the CPU."""
    import controlnet_lab.metrics.fid as fid_module
    from controlnet_lab.evaluation import MetricSuite, extra_scores

    devices = []

    def compute_fid(*args, device, **kwargs):
        devices.append(device)
        return 1.0

    monkeypatch.setattr(fid_module.cleanfid_fid, "compute_fid", compute_fid)
    images = np.zeros((2, 16, 16, 3), np.uint8)
    suite = MetricSuite(domain_features=lambda batch: batch, inception_features=lambda batch: batch, device="cuda:1")
    scores = extra_scores(suite, {"perfect": images, "targets": images}, ["", ""], {})
    assert scores["fid"] == scores["fid_domain"] == 1.0
    assert devices == [torch.device("cuda:1")] * 2
