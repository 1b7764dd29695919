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
    images = np.concatenate([images, images[:, ::-1], images[:, :, ::-1]])  # 144 images: more than the 64 feature dimensions
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
    from controlnet_lab.evaluation.held_out import MetricSuite, extra_scores

    devices = []

    def get_folder_features(folder, model, *, device, **kwargs):
        devices.append(device)
        return np.random.default_rng(len(devices)).normal(size=(4, 2))

    monkeypatch.setattr(fid_module.cleanfid_fid, "get_folder_features", get_folder_features)
    images = np.zeros((4, 16, 16, 3), np.uint8)
    suite = MetricSuite(domain_features=lambda batch: batch, inception_features=lambda batch: batch, device="cuda:1")
    scores = extra_scores(suite, {"perfect": images, "targets": images}, ["", ""], {})
    assert scores["fid"] > 0 and scores["fid_domain"] > 0 and scores["failed"] == {}
    assert devices == [torch.device("cuda:1")] * 4


def test_a_frechet_distance_from_fewer_images_than_dimensions_is_skipped_with_the_reason():
    """clean-fid's sqrtm fails or gives noise on singular covariances (scipy 1.17: LinAlgError -102 on 8 images in 64-d)."""
    from controlnet_lab.evaluation.held_out import MetricSuite, extra_scores

    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    wide = MetricSuite(domain_features=lambda batch: batch.flatten(1)[:, :64].float())
    scores = extra_scores(wide, {"perfect": images, "targets": images[::-1].copy()}, [""] * 8, {})
    assert "fid_domain" not in scores and scores["skipped"]["fid_domain"].startswith("8 images in a 64-d feature space")
    narrow = MetricSuite(domain_features=lambda batch: batch.float().mean((2, 3)))  # 3-d: 8 images are enough
    assert np.isfinite(extra_scores(narrow, {"perfect": images, "targets": images[::-1].copy()}, [""] * 8, {})["fid_domain"])


def test_a_metric_that_fails_is_recorded_beside_the_others(monkeypatch):
    from controlnet_lab.evaluation.held_out import MetricSuite, extra_scores

    def broken(batch):
        raise RuntimeError("the extractor broke")

    images = np.zeros((8, 16, 16, 3), np.uint8)
    suite = MetricSuite(domain_features=lambda batch: batch.float().mean((2, 3)), inception_features=broken)
    scores = extra_scores(suite, {"perfect": images, "targets": images}, [""] * 8, {})
    assert scores["failed"] == {"fid": "RuntimeError: the extractor broke"} and "fid_domain" in scores
