"""Sample grids a person can read: captioned base | tuned cells in several columns."""

import torch

from rlprox.images import caption_cells, grid_columns, make_grid


def test_pairs_are_laid_out_in_several_captioned_columns():
    n = 16
    base, tuned = torch.zeros(n, 3, 16, 16), torch.ones(n, 3, 16, 16)
    captions = [[f"a red seven number {i}", f"reward 0.{i} | 0.9"] for i in range(n)]
    cells = caption_cells([base, tuned], ["base", "tuned"], captions)
    _, _, h, w = cells.shape
    assert cells.shape[0] == n and w >= 2 * 64 and h > 64  # two images side by side, room for words
    cols = grid_columns(n)
    assert cols == 4
    grid = make_grid(cells, cols=cols)
    assert grid.shape == (4 * (h + 1) + 1, cols * (w + 1) + 1, 3)  # 4 pair-columns × 4 rows, not a 16 × 2 strip

    header, caption = cells[:, :, :12], cells[:, :, -40:]  # above the 64-px images, below them
    assert (header < 0.5).any(dim=(1, 2, 3)).all() and (caption < 0.5).any(dim=(1, 2, 3)).all()  # ink: text drawn
    assert not torch.equal(caption[0], caption[1])  # each pair's own prompt and rewards
    blank = caption_cells([base[:1], tuned[:1]], ["base", "tuned"], [[]])
    assert (blank[0, :, -40:] > 0.99).all()  # the ink above is the caption's, nothing else


def test_every_cell_has_one_size_whatever_its_caption():
    """Shards of a sharded evaluation are concatenated: long prompts wrap and are cut."""
    images = [torch.rand(2, 3, 16, 16)]
    short = caption_cells(images, ["tuned"], [["a"], ["b"]])
    long = caption_cells(images, ["tuned"], [["a very long prompt " * 20, "reward 1"], ["x"]])
    assert short.shape == long.shape
    assert grid_columns(1) == 1 and grid_columns(20) == 5
