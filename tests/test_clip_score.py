"""The CLIP-score path with a tiny random CLIP saved locally: mechanics, not values."""
import json
import string

import numpy as np
import pytest
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from controlnet_lab.metrics.clip_score import clip_score, clip_scorer


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
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer)
    processor.save_pretrained(folder)
    return folder


def test_clip_score_runs_from_a_local_folder(tiny_clip):
    scorer = clip_scorer(str(tiny_clip))
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    score = clip_score(scorer, images, ["red circle with blue background", "a cat", ""], batch_size=2)
    assert 0.0 <= score <= 100.0
    assert clip_score(scorer, images, ["red circle with blue background", "a cat", ""]) == pytest.approx(score, rel=1e-5)


def test_missing_clip_weights_name_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.clip.model"):
        clip_scorer(str(tmp_path / "nothing"))
