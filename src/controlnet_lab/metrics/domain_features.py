"""A feature space for FID on fill50k-style data, learned from the real images: "FID (domain features)".

Inception features mean little on 32-pixel two-color images and its weights need a
download, so the embedded default measures FID in the penultimate layer of a small CNN
trained to read the attributes the data varies in: circle color, background color
(classification over the palette) and the circle's center and radius (regression,
from the outline). It is trained once per dataset and resolution, seeded, and cached.
Scores in this space are comparable only with each other (same network, same number of
images), never with Inception FID; results label them ``fid_domain``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from controlnet_lab.data.colors import parse_prompt
from controlnet_lab.data.dataset import ControlDataset
from controlnet_lab.data.outlines import condition_mask


class DomainFeatureNet(nn.Module):
    def __init__(self, resolution: int, palette_size: int, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.resolution = resolution
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(),
            nn.Linear(2 * width * (resolution // 8) ** 2, feature_dim), nn.SiLU(),
        )
        self.circle_color = nn.Linear(feature_dim, palette_size)
        self.background_color = nn.Linear(feature_dim, palette_size)
        self.geometry = nn.Linear(feature_dim, 3)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, R, R) images in [-1, 1] -> (N, feature_dim)."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.features(images)
        return self.circle_color(features), self.background_color(features), self.geometry(features)

    def clean_fid_extractor(self):
        """The extractor clean-fid calls: (N, 3, 299, 299) in [0, 255] -> features, at the net's own resolution."""
        def extract(batch: torch.Tensor) -> torch.Tensor:
            small = F.interpolate(batch.float(), size=(self.resolution, self.resolution), mode="area")
            with torch.no_grad():
                return self.features(small / 127.5 - 1.0)
        return extract


def _labels(dataset: ControlDataset, palette: list[str]) -> tuple[torch.Tensor, ...]:
    images, circle, background, geometry = [], [], [], []
    resolution = dataset.resolution
    for row, prompt in zip(dataset.rows, dataset.prompts, strict=True):
        target, outline = dataset.samples.pair(int(row), resolution)
        images.append(target)
        names = parse_prompt(prompt)
        circle.append(palette.index(names[0]))
        background.append(palette.index(names[1]))
        ys, xs = np.nonzero(condition_mask(outline))
        geometry.append([xs.mean() / resolution, ys.mean() / resolution, np.sqrt(len(xs) / np.pi) / resolution])
    tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return tensor, torch.tensor(circle), torch.tensor(background), torch.tensor(geometry, dtype=torch.float32)


def train_domain_net(dataset: ControlDataset, palette: list[str], steps: int, batch_size: int = 128,
                     lr: float = 2e-3, seed: int = 0) -> DomainFeatureNet:
    torch.manual_seed(seed)
    images, circle, background, geometry = _labels(dataset, palette)
    net = DomainFeatureNet(dataset.resolution, len(palette))
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="training the FID domain feature net", unit="step"):
        batch = torch.randint(len(images), (batch_size,), generator=generator)
        circle_logits, background_logits, predicted_geometry = net(images[batch])
        loss = (F.cross_entropy(circle_logits, circle[batch]) + F.cross_entropy(background_logits, background[batch])
                + 10 * F.mse_loss(predicted_geometry, geometry[batch]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


def domain_net(dataset: ControlDataset, palette: list[str], cache_dir: Path, steps: int = 600,
               count: int = 4000, seed: int = 0) -> DomainFeatureNet:
    """The cached domain feature net for these fill50k-format training samples (the first ``count``), training it if absent."""
    used = ControlDataset(dataset.samples, dataset.rows[:count], dataset.resolution, with_condition=False)
    resolution = dataset.resolution
    settings = {"samples": used.fingerprint(), "resolution": resolution, "palette": palette, "steps": steps, "seed": seed}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"fid-domain-{key}.safetensors"
    net = DomainFeatureNet(resolution, len(palette))
    if path.is_file():
        net.load_state_dict(load_file(path))
        return net.eval()
    net = train_domain_net(used, palette, steps, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    save_file(net.state_dict(), staging)
    staging.replace(path)
    return net
