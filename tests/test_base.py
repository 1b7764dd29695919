import torch
from transformers import AutoTokenizer

from controlnet_lab.bases import load_base


def test_tokenizer_saves_and_loads_offline(tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base / "tokenizer")
    ids = tokenizer("Red circle with blue background").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.eos_token_id != 2  # CLIPTextModel pools at eos only when its id is not 2


def test_pipeline_round_trip_gives_identical_predictions(tiny_base, tmp_path):
    pipeline = load_base(tiny_base)
    pipeline.save_pretrained(tmp_path / "copy")
    again = load_base(tmp_path / "copy")
    sample = torch.randn(2, 3, 16, 16)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        outputs = []
        for p in (pipeline, again):
            hidden, pooled = p.encode_prompt(["red circle with blue background", ""])
            outputs.append(p.predict_noise(sample, t, hidden, pooled))
    assert torch.equal(*outputs)


def test_pipeline_generates_in_range_and_repeatably(tiny_base):
    pipeline = load_base(tiny_base)
    pipeline.set_progress_bar_config(disable=True)
    first = pipeline(["red circle with blue background"], num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    second = pipeline(["red circle with blue background"], num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert first.shape == (1, 3, 16, 16)
    assert first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, second)
