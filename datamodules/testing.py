"""Small helpers for tests and benchmarks: hand-built samples as the shard reader yields them.

(A tiny real tokenizer for tests comes from the world tokenizer trainer,
``modules.components.text_tokenizer.train_world_tokenizer``.)
"""
from __future__ import annotations

import io
from typing import Any, Dict, List, Optional

from PIL import Image


def solid_png(rgb=(200, 30, 30), size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="PNG")
    return buf.getvalue()


def decoded_sample(messages: List[Dict[str, str]], n_images: Optional[int] = None, key: str = "s0",
                   task: str = "understanding", size: int = 16, **record_extra: Any) -> Dict[str, Any]:
    """A decoded sample as the reader yields it, with solid-colour images."""
    from datamodules.schema import placeholders  # lazy: keeps this helper module import-free for benchmarks

    n = len(placeholders(messages)) if n_images is None else n_images
    images = [Image.new("RGB", (size, size), (10 * i, 100, 200)) for i in range(n)]
    record = {"id": key, "task": task, "source": "test", "messages": messages,
              "images": [f"img{i}.png" for i in range(n)], **record_extra}
    return {"key": key, "task": task, "record": record, "images": images, "vq": [None] * n, "n_unreadable": 0}
