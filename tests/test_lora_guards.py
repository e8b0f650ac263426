"""LoRALinear's own guards: slices that overlap or leave the output are refused, and merging is idempotent (a second
merge adds nothing; forward stays the adapted function)."""

import pytest
import torch
from torch import nn

from lmforge.lora import LoRALinear


def adapted(slices=None) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 12), r=2, alpha=3.0, slices=slices)
    with torch.no_grad():
        for adapter in layer.lora.values():
            adapter.B.normal_(0.0, 0.5)  # B = 0 at init would make every check pass
    return layer


@pytest.mark.parametrize("slices", [{"q": (0, 6), "k": (4, 4)}, {"q": (0, 6), "v": (8, 6)}, {"q": (12, 1)},
                                    {"q": (0, 0)}, {"a": (2, 4), "b": (0, 3)}],
                         ids=["overlap", "past-the-end", "starts-at-the-end", "empty", "overlap-out-of-order"])
def test_slices_that_overlap_or_leave_the_output_are_refused(slices):
    with pytest.raises(ValueError, match="overlaps another or leaves the 12 output features"):
        LoRALinear(nn.Linear(8, 12), r=2, alpha=3.0, slices=slices)


def test_adjacent_slices_cover_the_output_and_leave_the_rest_untouched():
    layer = adapted({"q": (0, 4), "k": (4, 4)})
    x = torch.randn(3, 8)
    y, plain = layer(x), nn.functional.linear(x, layer.weight, layer.bias)
    assert (y[:, :8] - plain[:, :8]).abs().max() > 1e-3 and torch.equal(y[:, 8:], plain[:, 8:])


def test_merging_twice_adds_the_adapters_once_and_unmerging_gives_the_weight_back():
    layer = adapted({"q": (0, 6), "v": (6, 6)})
    x = torch.randn(3, 8)
    weight = layer.weight.detach().clone()
    with torch.no_grad():
        expected = layer(x)
        layer.merge()
        layer.merge()
        assert (layer(x) - expected).abs().max() <= 1e-5
        layer.unmerge()
        layer.unmerge()
    assert (layer.weight - weight).abs().max() <= 1e-6 and not layer.merged
