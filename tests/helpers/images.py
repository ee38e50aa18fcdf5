"""Images for request bodies: PNG bytes and ``data:`` URLs (the fixtures' test images by seed)."""

from __future__ import annotations

import base64
import io

from PIL import Image

from vllm_halluguard.tiny_models import make_image


def png(image: Image.Image) -> bytes:
    """``image`` encoded as PNG."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(image: bytes | int) -> str:
    """A ``data:image/png;base64,...`` URL of PNG bytes, or of the test image with this seed."""
    raw = png(make_image(image)) if isinstance(image, int) else image
    return "data:image/png;base64," + base64.b64encode(raw).decode()
