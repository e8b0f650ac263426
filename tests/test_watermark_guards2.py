"""detect's z_threshold (generate/watermark.py): the prediction is z above the threshold the caller gives, not the
default's 3."""

from __future__ import annotations

import torch

from lmforge.generate.watermark import Watermark, detect


def test_the_prediction_follows_the_threshold_given():
    torch.manual_seed(1)
    ids = torch.randint(0, 299, (60,)).tolist()
    mark = Watermark()
    z = detect(ids, 300, mark)["z_score"]
    assert abs(z) < 3  # unmarked text: below the default threshold
    assert detect(ids, 300, mark, z_threshold=z - 0.01)["prediction"] is True
    assert detect(ids, 300, mark, z_threshold=z + 0.01)["prediction"] is False
    assert detect(ids, 300, mark, z_threshold=3.0)["prediction"] is False
