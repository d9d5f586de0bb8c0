import pytest
import torch
import torch.nn.functional as F

from patchcore.engine.features import PatchFeatures, channel_pooling_matrix, layer_widths


def test_layer_widths_never_inflate_channels():
    assert layer_widths([512, 1024], 1024) == [512, 512]  # WRN50 as the paper
    assert layer_widths([40, 112], None) == [40, 112]
    assert layer_widths([40, 112], 1024) == [40, 112]  # narrow backbones are not blown up
    assert layer_widths([40, 112], 100) == [40, 60]  # the narrow layer's leftover goes to the other
    assert sum(layer_widths([64, 128, 256], 200)) == 200
    with pytest.raises(ValueError):
        layer_widths([40, 112], 1)


def test_pooling_matrix_is_adaptive_average_pooling():
    x = torch.randn(5, 37)
    expected = F.adaptive_avg_pool1d(x[:, None, :], 12)[:, 0, :]
    assert torch.allclose(x @ channel_pooling_matrix(37, 12).T, expected, atol=1e-6)


def _paper_order(maps, widths, p):
    """Reference: neighbourhood average, resize deeper maps, then pool channels per layer."""
    grid = maps[0].shape[-2:]
    parts = []
    for fmap, width in zip(maps, widths):
        fmap = F.avg_pool2d(fmap, p, stride=1, padding=p // 2)
        fmap = F.interpolate(fmap, size=grid, mode="bilinear", align_corners=False)
        b, c, h, w = fmap.shape
        pixels = fmap.permute(0, 2, 3, 1).reshape(-1, 1, c)
        parts.append(F.adaptive_avg_pool1d(pixels, width).reshape(b, h, w, width))
    return torch.cat(parts, dim=-1)


@pytest.mark.parametrize("p", [1, 3, 5])
def test_features_equal_the_papers_order_of_operations(p):
    maps = [torch.randn(2, 16, 12, 12), torch.randn(2, 48, 6, 6)]
    module = PatchFeatures([16, 48], feature_width=40, neighbourhood=p)
    assert module.widths == [16, 24] and module.width == 40
    got = module(maps)
    assert got.shape == (2, 12, 12, 40)
    assert torch.allclose(got, _paper_order(maps, [16, 24], p), atol=1e-5)


def test_neighbourhood_must_be_odd():
    with pytest.raises(ValueError, match="odd"):
        PatchFeatures([8], neighbourhood=2)
