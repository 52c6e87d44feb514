import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from magic_mm.errors import CompressionSpecError
from magic_mm.model.compression import Compression


def reference_bilinear(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Plain-loop bilinear resampling with half-pixel centres (align_corners=False)."""
    b, h, w, c = grid.shape
    out = np.zeros((b, out_h, out_w, c), dtype=np.float64)
    for oy in range(out_h):
        sy = max((oy + 0.5) * h / out_h - 0.5, 0.0)
        y0 = min(int(math.floor(sy)), h - 1)
        y1 = min(y0 + 1, h - 1)
        fy = sy - y0
        for ox in range(out_w):
            sx = max((ox + 0.5) * w / out_w - 0.5, 0.0)
            x0 = min(int(math.floor(sx)), w - 1)
            x1 = min(x0 + 1, w - 1)
            fx = sx - x0
            top = grid[:, y0, x0] * (1 - fx) + grid[:, y0, x1] * fx
            bottom = grid[:, y1, x0] * (1 - fx) + grid[:, y1, x1] * fx
            out[:, oy, ox] = top * (1 - fy) + bottom * fy
    return out


@pytest.mark.parametrize(
    "spec, grid, tokens",
    [
        ("none", (14, 14), 196),
        ("bilinear:2", (14, 14), 49),
        ("bilinear:4", (14, 14), 16),  # ceil(3.5) = 4
        ("avgpool:2", (14, 14), 49),
        ("pixel_unshuffle:2", (14, 14), 49),
        ("bilinear:2", (7, 7), 16),  # ceil(3.5) = 4 per side: no region dropped
        ("avgpool:2", (7, 7), 16),
        ("pixel_unshuffle:2", (7, 7), 16),
        ("bilinear:5x3", (14, 14), 15),
        ("bilinear:2", (32, 32), 256),  # InternVL tile before its own pixel shuffle
    ],
)
def test_token_counts_and_shapes(spec, grid, tokens):
    comp = Compression.parse(spec)
    h, w = grid
    x = torch.randn(2, h, w, 8)
    y = comp(x)
    assert y.shape[1] * y.shape[2] == tokens
    assert comp.output_grid(h, w) == (y.shape[1], y.shape[2])
    assert y.shape[-1] == 8 * comp.channel_multiplier()
    assert y.shape[0] == 2


@pytest.mark.parametrize("h, w, out", [(14, 14, (7, 7)), (7, 7, (4, 4)), (9, 5, (3, 2)), (4, 4, (8, 8))])
def test_bilinear_equals_reference(h, w, out):
    x = torch.randn(2, h, w, 3, dtype=torch.float64)
    y = Compression("bilinear", target=out)(x)
    np.testing.assert_allclose(y.numpy(), reference_bilinear(x.numpy(), *out), atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 20), w=st.integers(1, 20), s=st.integers(1, 5))
def test_bilinear_factor_matches_reference_on_any_grid(h, w, s):
    x = torch.randn(1, h, w, 2, dtype=torch.float64)
    comp = Compression("bilinear", factor=s)
    out = comp.output_grid(h, w)
    assert out == (math.ceil(h / s), math.ceil(w / s))
    np.testing.assert_allclose(comp(x).numpy(), reference_bilinear(x.numpy(), *out), atol=1e-10)


def test_bilinear_by_two_on_even_grid_is_the_mean_of_each_block():
    # Half-pixel sampling at s = 2 lands between four cells, each weighted 1/4.
    x = torch.randn(1, 6, 8, 4, dtype=torch.float64)
    blocks = x.reshape(1, 3, 2, 4, 2, 4).mean(dim=(2, 4))
    torch.testing.assert_close(Compression.parse("bilinear:2")(x), blocks)


def test_avgpool_even_grid_is_block_mean_and_odd_grid_overlaps():
    x = torch.arange(16, dtype=torch.float64).reshape(1, 4, 4, 1)
    y = Compression.parse("avgpool:2")(x)
    assert y[0, :, :, 0].tolist() == [[2.5, 4.5], [10.5, 12.5]]
    odd = torch.arange(9, dtype=torch.float64).reshape(1, 3, 3, 1)
    z = Compression.parse("avgpool:2")(odd)  # 3x3 -> 2x2, windows rows/cols {0,1} and {1,2}
    assert z[0, :, :, 0].tolist() == [[2.0, 3.0], [5.0, 6.0]]


def test_pixel_unshuffle_stacks_blocks_and_zero_pads():
    x = torch.arange(9, dtype=torch.float32).reshape(1, 3, 3, 1)
    y = Compression.parse("pixel_unshuffle:2")(x)
    assert y.shape == (1, 2, 2, 4)
    assert y[0, 0, 0].tolist() == [0, 1, 3, 4]
    assert y[0, 1, 1].tolist() == [8, 0, 0, 0]  # bottom-right block is mostly padding


def test_none_is_identity():
    x = torch.randn(1, 5, 5, 3)
    assert Compression.parse("none")(x) is x
    assert Compression.parse(None).is_identity


@pytest.mark.parametrize("bad", ["bilinearx", "bilinear:0", "bilinear:a", "none:2", "pixel_unshuffle:3x3", "bilinear:0x4"])
def test_bad_specs_raise_user_errors(bad):
    with pytest.raises(CompressionSpecError):
        Compression.parse(bad)


def test_spec_round_trips_through_str():
    for spec in ["none", "bilinear:2", "avgpool:4", "pixel_unshuffle:2", "bilinear:7x5"]:
        assert str(Compression.parse(spec)) == spec
    assert str(Compression.parse("bilinear")) == "bilinear:2"


@pytest.mark.parametrize("size", [14, 32])
def test_bilinear_2_is_avgpool_2_on_an_even_grid(size):
    """Half-pixel bilinear by 2 samples each 2x2 block's centre: a 2x2 average (so not an ablation)."""
    grid = torch.randn(2, size, size, 16, generator=torch.Generator().manual_seed(size))
    bilinear, avgpool = Compression.parse("bilinear:2")(grid), Compression.parse("avgpool:2")(grid)
    assert torch.allclose(bilinear, avgpool, atol=1e-6)


def test_the_bench_default_variants_are_different_operators():
    """Each pair of default bench variants with the same token count computes different grids."""
    from magic_mm.eval.bench import BenchSettings

    grid = torch.randn(1, 14, 14, 16, generator=torch.Generator().manual_seed(0))
    outputs = {spec: Compression.parse(spec)(grid) for spec in BenchSettings().compressions}
    specs = list(outputs)
    for n, a in enumerate(specs):
        for b in specs[n + 1 :]:
            if outputs[a].shape == outputs[b].shape:
                assert (outputs[a] - outputs[b]).abs().max() > 1e-2, (a, b)
    assert any(outputs[a].shape == outputs[b].shape for n, a in enumerate(specs) for b in specs[n + 1 :])
