"""A word-level tokenizer built from a dataset's prompts, so the tiny base needs no download.

It is a real ``transformers`` tokenizer (``PreTrainedTokenizerFast`` over a
``tokenizers`` WordLevel model): it saves with ``save_pretrained`` beside the model
and loads back with ``AutoTokenizer.from_pretrained``.
"""
from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

# eos must not get id 2: CLIPTextModel then falls back to a legacy pooling (argmax of ids).
SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}


def build_word_tokenizer(prompts: Iterable[str], max_length: int) -> PreTrainedTokenizerFast:
    words = sorted({word for prompt in prompts for word in prompt.lower().split()})
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    for word in words:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>",
        special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])],
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=max_length, **SPECIAL_TOKENS)
