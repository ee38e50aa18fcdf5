"""The scheduler's rule for SCR images (no engine): a step holds an image whole or not at all."""

import pytest

from vllm_halluguard.engine.two_pass import cuts_image, whole_image_tokens

SPAN = (6, 582)  # LLaVA-1.5: 576 image tokens after 6 text tokens


@pytest.mark.parametrize(
    ("computed", "num_new", "expected"),
    [
        (0, 6, 6),  # text before the image only
        (0, 4, 4),
        (0, 600, 600),  # the whole prompt
        (0, 582, 582),  # ends exactly at the image's end
        (0, 571, 6),  # would cut the image: stop before it
        (0, 7, 6),
        (6, 576, 576),  # exactly the image
        (6, 590, 590),
        (6, 571, 0),  # the image is next but does not fit: wait
        (6, 1, 0),
        (582, 3, 3),  # after the image
        (600, 1, 1),  # decoding
    ],
)
def test_whole_image_tokens(computed, num_new, expected):
    assert whole_image_tokens(computed, num_new, SPAN) == expected
    if expected:
        assert not cuts_image(computed, expected, SPAN)


@pytest.mark.parametrize(
    ("first", "num_tokens", "cut"),
    [
        (0, 6, False),
        (0, 582, False),
        (6, 576, False),
        (582, 10, False),
        (0, 7, True),
        (6, 575, True),
        (300, 282, True),  # the rest of an image whose start an earlier step computed
        (300, 400, True),
        (7, 1, True),
    ],
)
def test_cuts_image(first, num_tokens, cut):
    assert cuts_image(first, num_tokens, SPAN) is cut
