"""Small helpers for tests and benchmarks: a tiny real HF tokenizer and hand-built samples.

The tokenizer is a byte-level BPE trained in milliseconds on the world's vocabulary and the
chat template, wrapped in transformers.PreTrainedTokenizerFast with our special tokens added,
so collation runs through the same code path as with a Llama/Qwen tokenizer.
"""
from __future__ import annotations

import io
from typing import Any, Dict, List, Optional, Sequence

from PIL import Image

from datamodules.tokens import SPECIAL_TOKENS

_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions.",
    "USER: ASSISTANT: Describe the image briefly. What is in this picture? Give a short caption.",
    "There is a large red circle on the left and two small blue squares at the top.",
    "The image shows a green triangle at the bottom, a yellow cross in the centre, a purple square on the right.",
    "What colour is the circle? What shape is the black object? How many objects are there? Where is the red cross?",
    "Is there a blue triangle in the image? Is the square green? yes no 0 1 2 3 one two three circles squares "
    "triangles crosses Answer with a single word. Draw I need an image of Generate a picture with Please paint",
]


def tiny_tokenizer(extra_corpus: Sequence[str] = (), vocab_size: int = 600) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS) + list(extra_corpus), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>")
    hf.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    return hf


def solid_png(rgb=(200, 30, 30), size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="PNG")
    return buf.getvalue()


def decoded_sample(messages: List[Dict[str, str]], n_images: Optional[int] = None, key: str = "s0",
                   task: str = "understanding", size: int = 16, **record_extra: Any) -> Dict[str, Any]:
    """A decoded sample as the reader yields it, with solid-colour images."""
    from datamodules.schema import placeholders

    n = len(placeholders(messages)) if n_images is None else n_images
    images = [Image.new("RGB", (size, size), (10 * i, 100, 200)) for i in range(n)]
    record = {"id": key, "task": task, "source": "test", "messages": messages,
              "images": [f"img{i}.png" for i in range(n)], **record_extra}
    return {"key": key, "task": task, "record": record, "images": images, "vq": [None] * n, "n_unreadable": 0}
