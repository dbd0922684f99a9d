"""Fixtures for model backend tests: tiny random models built on the fly, and a way to drive a backend with Jobs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from model_jobs import TINY_CONTEXT, requires

# Text to train the tiny tokenizer on: words, punctuation and multi-byte characters, so byte-level tokens
# that split one character across two tokens really occur.
_CORPUS = [
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a small model that answered questions about cities.",
    "Zürich, São Paulo, Kraków and Malmö are cities; 東京 and 大阪 are in Japan; ☕ and 🚀 too.",
    "user assistant system: hello, how are you? I am fine, thank you! 1 2 3 4 5 6 7 8 9 10",
]
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with a byte-level BPE tokenizer trained here, saved as an HF folder."""
    return _tiny_llama(tmp_path_factory.mktemp("tiny-chat"), layers=2, tied=False)


@pytest.fixture(scope="session")
def tiny_deep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with 4 layers and tied embeddings (the head reads the embedding table, as SmolLM2's does):
    enough layers to cut into 2 and 3 stages."""
    return _tiny_llama(tmp_path_factory.mktemp("tiny-deep"), layers=4, tied=True)


def _tiny_llama(folder: Path, layers: int, tied: bool) -> Path:
    requires("torch", "transformers", "tokenizers")
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)

    torch.manual_seed(1234)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_CONTEXT,
        tie_word_embeddings=tied,
        initializer_range=0.3,  # peaked logits: greedy choices are far from ties, so runs compare exactly
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # A random model would end rows at random; with a zero EOS row it (almost) never does, so the
        # tests control when a row ends. EOS handling is covered by the real SmolLM2 test.
        model.lm_head.weight[eos].zero_()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_onnx(tiny_chat_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The tiny Llama built by onnxruntime-genai's model builder (fp32) and served by the onnx engine."""
    requires("onnxruntime", "onnxruntime_genai", "tokenizers", "jinja2")
    from nodes.models.backends.onnx_chat import OnnxChat

    backend = OnnxChat("tiny", tiny_chat_dir, cache_dir=tmp_path_factory.mktemp("onnx-cache"), precision="fp32")
    backend.load()
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def tiny_embed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random BERT with a small WordPiece vocabulary, as sentence-transformers would ship it."""
    requires("torch", "transformers", "onnxruntime", "onnxscript")
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-embed")
    words = sorted({w.strip(".,;:!?").lower() for line in _CORPUS for w in line.split()} - {""})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *list("abcdefghijklmnopqrstuvwxyz0123456789")]
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + [w for w in words if w not in vocab]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(99)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24, "do_lower_case": False}))
    return folder
