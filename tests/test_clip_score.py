"""The CLIP-score path with a tiny random CLIP saved locally: the score against a computation by hand."""
import json
import string

import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from controlnet_lab.metrics.clip_score import _projected, clip_score, clip_scorer


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    symbols = list(string.ascii_lowercase + string.digits + ",.-'")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols:
        vocab.setdefault(symbol, len(vocab))
        vocab.setdefault(symbol + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer)
    processor.save_pretrained(folder)
    return folder


@torch.no_grad()
def by_hand(folder, images, prompts) -> float:
    """max(mean of 100 x cos(image features, text features), 0): what torchmetrics' CLIPScore computes (it clamps
    the mean, not each image, although its docstring writes the clamp per image), with transformers alone."""
    model, processor = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    inputs = processor(text=prompts, images=list(images), return_tensors="pt", padding=True)
    image = _projected(model.get_image_features(pixel_values=inputs["pixel_values"]))
    text = _projected(model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]))
    cosine = torch.nn.functional.cosine_similarity(image, text, dim=-1)
    return float((100 * cosine).mean().clamp_min(0))


def test_clip_score_from_a_local_folder_matches_the_definition(tiny_clip):
    scorer = clip_scorer(str(tiny_clip))
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    prompts = ["red circle with blue background", "a cat", "blue"]
    expected = by_hand(tiny_clip, images, prompts)
    assert expected > 0
    assert clip_score(scorer, images, prompts, batch_size=2) == pytest.approx(expected, rel=1e-4)
    # The score pairs each image with its own prompt: another pairing scores differently.
    assert clip_score(scorer, images, prompts[::-1]) == pytest.approx(by_hand(tiny_clip, images, prompts[::-1]), rel=1e-4)
    assert by_hand(tiny_clip, images, prompts[::-1]) != pytest.approx(expected, rel=1e-3)


@pytest.mark.bad_input
def test_missing_clip_weights_name_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.clip.model"):
        clip_scorer(str(tmp_path / "nothing"))
