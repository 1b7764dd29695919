"""Real folders as users' tools write them: what datasets' imagefolder reads is read, every image mode is converted
faithfully or refused by name, and an image smaller than the resolution is enlarged by the configured rule."""
import json
from pathlib import Path

import cv2
import datasets
import numpy as np
import pytest
from PIL import Image

from controlnet_lab.data.datamodule import FolderDataModule
from controlnet_lab.data.samples import DatasetFormatError, check_resize, decode_rgb, fit_square

SETTINGS = dict(name="own", resolution=16, batch_size=2, val_size=2, split_seed=0)
GRADIENT = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))  # 16 x 16, values 0..240


def folder_with_metadata(root: Path, encode) -> Path:
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(6):
        Image.fromarray(np.roll(GRADIENT, i, axis=1)).convert("RGB").save(root / "images" / f"{i}.png")
        lines.append(json.dumps({"file_name": f"images/{i}.png", "text": f"caf\u00e9 n\u00b0{i}"}, ensure_ascii=False))
    (root / "metadata.jsonl").write_bytes(encode(lines))
    return root


WINDOWS_WRITES = {
    "utf-8 with a byte-order mark, CRLF": lambda lines: "\ufeff".encode() + "\r\n".join(lines).encode() + b"\r\n",
    "CR line endings, blank lines, no final newline": lambda lines: "\r\r".join(lines).encode(),
}


@pytest.mark.parametrize("case", WINDOWS_WRITES)
def test_metadata_that_datasets_reads_is_read(tmp_path, case):
    root = folder_with_metadata(tmp_path / "own", WINDOWS_WRITES[case])
    assert len(datasets.load_dataset("imagefolder", data_dir=str(root), split="train", cache_dir=str(tmp_path / "hf"))) == 6
    data = FolderDataModule(root=str(root), condition="canny", cache_dir=tmp_path / "cache", **SETTINGS)
    data.setup()
    assert len(data.train_rows) == 4 and data.train_samples.prompts[0] == "caf\u00e9 n\u00b00"


@pytest.mark.bad_input
def test_metadata_in_another_encoding_is_named_with_its_line(tmp_path):
    root = folder_with_metadata(tmp_path / "own", lambda lines: "\n".join(lines).encode("latin-1"))
    data = FolderDataModule(root=str(root), condition="canny", cache_dir=tmp_path / "cache", **SETTINGS)
    with pytest.raises(DatasetFormatError, match=r"metadata.jsonl, line 1: not UTF-8 text .*save the file as UTF-8"):
        data.setup()


def encoded(image: Image.Image, suffix: str = ".png", **kwargs) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format={".png": "PNG", ".tif": "TIFF", ".jpg": "JPEG"}[suffix], **kwargs)
    return buffer.getvalue()


def test_wide_and_unusual_modes_keep_what_their_pixels_mean():
    sixteen = Image.fromarray((GRADIENT.astype(np.uint16) * 257))  # 16-bit grayscale, e.g. a depth map
    assert sixteen.mode in ("I;16", "I")
    decoded = decode_rgb(encoded(sixteen), None, "row 0")
    assert np.array_equal(decoded[..., 0], GRADIENT) and decoded.shape == (16, 16, 3)  # PIL's own RGB conversion whitens it
    floats = Image.fromarray(GRADIENT.astype(np.float32) / 255.0, mode="F")
    assert np.array_equal(decode_rgb(encoded(floats, ".tif"), None, "row 0")[..., 1], GRADIENT)
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0], rgba[:8, :, 3] = 200, 255  # red on the top half, transparent below
    decoded = decode_rgb(encoded(Image.fromarray(rgba, "RGBA")), None, "row 0")
    assert (decoded[:8] == (200, 0, 0)).all() and (decoded[8:] == 255).all()  # composited over white
    cmyk = Image.fromarray(np.stack([GRADIENT] * 3, axis=2)).convert("CMYK")
    assert decode_rgb(encoded(cmyk, ".tif"), None, "row 0").std() > 0
    palette = Image.fromarray(np.stack([GRADIENT] * 3, axis=2)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    assert np.array_equal(decode_rgb(encoded(palette), None, "row 0")[..., 0], GRADIENT)


@pytest.mark.bad_input
def test_an_image_that_decoding_would_flatten_is_refused_by_name():
    faint = Image.fromarray(np.tile(np.arange(1000, 1016, dtype=np.uint16), (16, 1)))  # 16-bit, varies by 16 of 65,535
    with pytest.raises(DatasetFormatError, match=r"row 3: image \(stored bytes\): decoding mode I.* gives one flat color"):
        decode_rgb(encoded(faint), None, "row 3")
    loud = Image.fromarray(np.full((4, 4), 3.5, np.float32) * np.arange(16, dtype=np.float32).reshape(4, 4), mode="F")
    with pytest.raises(DatasetFormatError, match=r"mode F with values in \[0, 52.5\] has no known range"):
        decode_rgb(encoded(loud, ".tif"), None, "row 3")


def test_enlarging_follows_the_configured_rule():
    small = np.zeros((4, 4, 3), np.uint8)
    small[:, 2:] = 255
    assert set(np.unique(fit_square(small, 16, "nearest"))) == {0, 255}  # a label map or a thin line stays as it is
    smooth = fit_square(small, 16)  # bilinear by default, as diffusers' script
    assert len(np.unique(smooth)) > 2
    assert np.array_equal(smooth, cv2.resize(small, (16, 16), interpolation=cv2.INTER_LINEAR))
    with pytest.raises(ValueError, match=r"data.resize.image='lanczos4'"):
        check_resize({"image": "lanczos4"})
