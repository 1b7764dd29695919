"""FID through clean-fid: Inception features (clean mode) or any custom feature extractor.

clean-fid reads two folders of images, resizes them to 299x299 with its "clean"
(PIL bicubic, anti-aliased) resize, and passes batches in [0, 255] to the feature
extractor; ``frechet_distance`` is its own. The Inception weights
(``inception-2015-12-05.pt``, a TorchScript file) come from a configured local path;
where it is missing, clean-fid's download is tried, and where that fails too the
error names the file, its URL and where to put it.
"""
from __future__ import annotations

import socket
import tempfile
import urllib.error
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from cleanfid import fid as cleanfid_fid
from cleanfid.downloads_helper import check_download_inception, inception_url
from cleanfid.inception_torchscript import InceptionV3W
from PIL import Image

INCEPTION_FILE = "inception-2015-12-05.pt"
FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]


def inception_extractor(weights_dir: str | Path, device: str = "cpu", download: bool = True) -> FeatureExtractor:
    """clean-fid's Inception (2048-d pool features) from ``weights_dir/inception-2015-12-05.pt``, downloaded there if allowed."""
    folder = Path(weights_dir)
    if not (folder / INCEPTION_FILE).is_file():
        try:
            if not download:
                raise OSError("eval.fid.download=false")
            folder.mkdir(parents=True, exist_ok=True)
            with socket_timeout(60):
                check_download_inception(fpath=str(folder))
        except (urllib.error.URLError, OSError) as err:
            (folder / INCEPTION_FILE).unlink(missing_ok=True)  # no half-downloaded file left behind
            raise FileNotFoundError(
                f"eval.fid.inception_dir={weights_dir}: Inception FID needs {INCEPTION_FILE} in that folder and it could "
                f"not be downloaded ({err}). Fetch {inception_url} on a machine with network and copy it to "
                f"{folder / INCEPTION_FILE}, or set eval.fid.inception=false."
            ) from None
    model = InceptionV3W(str(folder), download=False, resize_inside=False).to(device).eval()
    return lambda batch: model(batch)


@contextmanager
def socket_timeout(seconds: float):
    """clean-fid's download has no timeout; without network it would otherwise hang."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def write_images(images: np.ndarray, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:06d}.png")
    return folder


class TooFewImages(ValueError):
    """A Fréchet distance that would mean nothing: fewer images than feature dimensions make the covariances singular."""


def fid(images_a: np.ndarray, images_b: np.ndarray, extractor: FeatureExtractor, device: str = "cpu", batch_size: int = 64) -> float:
    """clean-fid's FID (clean mode) between two sets of (N, H, W, 3) uint8 images, in the extractor's feature space:
    its feature extraction and ``frechet_distance``, as its ``compute_fid`` of two folders, after checking that each
    set has more images than the features have dimensions (``TooFewImages`` otherwise)."""
    with tempfile.TemporaryDirectory(prefix="fid-") as tmp:
        features = [
            cleanfid_fid.get_folder_features(str(write_images(images, Path(tmp) / name)), extractor, num_workers=0,
                                             batch_size=batch_size, device=torch.device(device), mode="clean", verbose=False)
            for name, images in (("a", images_a), ("b", images_b))
        ]
    dims, fewest = features[0].shape[1], min(len(f) for f in features)
    if fewest <= dims:
        raise TooFewImages(f"{fewest} images in a {dims}-d feature space give singular covariances, so a Fréchet distance "
                           f"means nothing; it needs more than {dims} images (eval.num_images)")
    statistics = [(np.mean(f, axis=0), np.cov(f, rowvar=False)) for f in features]
    return float(cleanfid_fid.frechet_distance(*statistics[0], *statistics[1]))
