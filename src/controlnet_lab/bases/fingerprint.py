"""What identifies a locked base: a hash of its weights, and the check that a checkpoint meets the base it was trained on."""
from __future__ import annotations

import hashlib
from pathlib import Path

# Every locked part of every family: SD's, SDXL's second text encoder, SD3's transformer and third text encoder.
LOCKED_FOLDERS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")


def base_fingerprint(folder: str | Path) -> str:
    """sha256 over the weights of the base's denoiser (UNet or transformer), text encoders and VAE: the same locked model
    wherever it is stored."""
    digest = hashlib.sha256()
    files = sorted(p for sub in LOCKED_FOLDERS for p in (Path(folder) / sub).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no safetensors weights in {', '.join(f'{sub}/' for sub in LOCKED_FOLDERS)} (not a saved base)")
    for path in files:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def check_same_base(source: str | Path, recorded: str | None, folder: str | Path, fingerprint: str | None = None) -> None:
    """A checkpoint (``source``) whose recorded base fingerprint differs from the base now at ``folder`` is refused,
    naming both: the folder's weights changed since it was trained. ``fingerprint``: the folder's, if known."""
    if not recorded:
        return
    found = fingerprint or base_fingerprint(folder)
    if found != recorded:
        raise ValueError(f"{source} was trained on a locked base with fingerprint {recorded}, but the base at {folder} "
                         f"has fingerprint {found}: the base folder changed since; restore it or retrain")
