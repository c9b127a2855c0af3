"""The trainer's sample grids: its quantization and layout on top of cm_nets.files (tested there)."""

import numpy as np
import pytest
import torch
from cm_nets.files import load_png
from cm_train import make_grid, write_png


def test_make_grid_rounds_to_nearest_and_tiles_sqrt_n_per_row():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.999, 1.0, 2.0]).view(6, 1, 1, 1)
    grid = make_grid(x)  # ⌈√6⌉ = 3 per row, 2 rows, 1 pixel of white padding
    assert grid.shape == (5, 7, 1) and grid.dtype == np.uint8
    assert grid[1, 1::2, 0].tolist() == [0, 0, 128] and grid[3, 1::2, 0].tolist() == [255, 255, 255]
    assert make_grid(torch.zeros(4, 3, 2, 2), nrow=4).shape == (4, 13, 3)
    with pytest.raises(ValueError, match="1|3"):
        make_grid(torch.zeros(2, 2, 4, 4))


def test_write_png_upscales(tmp_path):
    path = write_png(tmp_path / "g.png", np.array([[0, 255]], np.uint8), scale=3)
    np.testing.assert_array_equal(load_png(path)[..., 0], np.array([[0] * 3 + [255] * 3] * 3, np.uint8))
