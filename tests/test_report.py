import sys

import numpy as np
import pytest
from PIL import Image

from cmboost.demo.report import frontier_series
from cmboost.errors import OutputExistsError, UserInputError
from cmboost.files.report import DIFFERENCE_GAIN, amplified_difference, image_grid, line_plot, save_before_after_grid, save_labelled_grid, save_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_image_grid_places_each_tile_row_major_with_padding():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 200, (5, 1, 4, 3), dtype=np.uint8)  # below the 255 padding, so tiles stand out
    grid = image_grid(images, columns=3, pad=2)
    assert grid.shape == (2 * (4 + 2) + 2, 3 * (3 + 2) + 2) and grid.dtype == np.uint8
    expected = np.full(grid.shape, 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, 3)
        expected[2 + 6 * r: 6 + 6 * r, 2 + 5 * c: 5 + 5 * c] = image[0]
    np.testing.assert_array_equal(grid, expected)  # the sixth slot stays padding


def test_image_grid_keeps_rgb_channels_in_order():
    images = np.zeros((2, 3, 2, 2), np.uint8)
    images[:, 0], images[:, 1], images[:, 2] = 10, 20, 30
    grid = image_grid(images, columns=2, pad=1, value=0)
    assert grid.shape == (4, 7, 3)
    np.testing.assert_array_equal(grid[1, 1], [10, 20, 30])
    np.testing.assert_array_equal(grid[1, 4], [10, 20, 30])
    np.testing.assert_array_equal(grid[0, 0], [0, 0, 0])


def colour(cls, row, after):
    """A colour per (class, sample, panel) with R != G, which the grey label text never produces."""
    return (10 + 40 * cls, 5 + 30 * row, 100 if after else 200)


def test_labelled_grid_puts_classes_in_columns_samples_in_rows_and_before_left_of_after(tmp_path):
    labels = np.array([0, 2, 0, 1, 2, 0])  # class 0: 3 samples, class 1: 1, class 2: 2; class 3 absent
    rows_of = {i: int((labels[:i] == labels[i]).sum()) for i in range(len(labels))}
    before = np.zeros((len(labels), 3, 6, 6), np.uint8)
    after = np.zeros_like(before)
    for i, cls in enumerate(labels):
        before[i] = np.array(colour(cls, rows_of[i], False), np.uint8)[:, None, None]
        after[i] = np.array(colour(cls, rows_of[i], True), np.uint8)[:, None, None]
    path = save_labelled_grid(before, after, labels, tmp_path / "grid.png", class_names=list("abcd"),
                              per_class=2, scale=2)
    image = np.asarray(Image.open(path).convert("RGB"))

    boxes = {}
    for i, cls in enumerate(labels):
        for after_panel in (False, True):
            ys, xs = np.nonzero((image == colour(cls, rows_of[i], after_panel)).all(axis=2))
            if rows_of[i] >= 2:  # per_class=2 leaves the third sample of class 0 out
                assert len(ys) == 0
                continue
            assert len(ys) == 12 * 12 and np.ptp(ys) == 11 and np.ptp(xs) == 11  # one 2x-upscaled tile
            boxes[cls, rows_of[i], after_panel] = (ys.min(), xs.min())
    for after_panel in (False, True):
        assert boxes[0, 0, after_panel][1] < boxes[1, 0, after_panel][1] < boxes[2, 0, after_panel][1]
        assert boxes[0, 0, after_panel][0] == boxes[1, 0, after_panel][0] < boxes[0, 1, after_panel][0]
        assert boxes[0, 1, after_panel][1] == boxes[0, 0, after_panel][1]
    assert max(x for (_, _, a), (_, x) in boxes.items() if not a) < min(x for (_, _, a), (_, x) in boxes.items() if a)
    assert all(boxes[c, r, False][0] == boxes[c, r, True][0] for c, r, _ in boxes)
    # right of "after": the amplified difference of each tile, in the same place of its own panel
    shift = boxes[0, 0, True][1] - boxes[0, 0, False][1]
    for (cls, row, after_panel), (y, x) in boxes.items():
        if not after_panel:
            continue
        i = next(i for i in range(len(labels)) if labels[i] == cls and rows_of[i] == row)
        expected = np.minimum(np.abs(after[i, :, 0, 0].astype(int) - before[i, :, 0, 0].astype(int)) * DIFFERENCE_GAIN,
                              255)
        assert (image[y: y + 12, x + shift: x + shift + 12] == expected).all(), (cls, row)

    # class 1 has one sample: its second row is blank; below the last row, each column carries its name
    row_step = boxes[0, 1, False][0] - boxes[0, 0, False][0]
    y1, x1 = boxes[1, 0, False]
    assert (image[y1 + row_step: y1 + row_step + 12, x1: x1 + 12] == 255).all()
    bottom = boxes[0, 1, False][0] + 12
    for cls in range(3):
        for after_panel in (False, True):
            x = boxes[cls, 0, after_panel][1]
            assert (image[bottom + 2:, x - 2: x + 14] < 128).any(), (cls, after_panel)
    with pytest.raises(OutputExistsError):
        save_labelled_grid(before, after, labels, path, class_names=list("abcd"))


def test_labelled_grid_upscales_small_images_to_be_seen(tmp_path):
    labels = np.arange(10).repeat(8)
    images = np.zeros((80, 1, 28, 28), np.uint8)
    path = save_labelled_grid(images, images, labels, tmp_path / "grid.png")
    width, height = Image.open(path).size
    assert width >= 3 * 10 * 96 and height >= 8 * 96  # 10 classes x 8 samples, tiles of >= 96 px, three panels


def test_before_after_grid_and_save_png_refuse_to_overwrite(tmp_path):
    images = np.full((3, 1, 4, 4), 7, np.uint8)
    path = save_before_after_grid(images, images + 1, tmp_path / "ba.png", scale=2)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * (8 + 4) + 4, 3 * (8 + 4) + 4)
    assert grid[4, 4] == 7 and grid[4 + 12, 4] == 8
    with pytest.raises(OutputExistsError):
        save_before_after_grid(images, images, path)
    with pytest.raises(OutputExistsError):
        save_png(grid, path)
    save_png(np.zeros((2, 2), np.uint8), path, overwrite=True)
    assert Image.open(path).size == (2, 2)


SERIES = {"a: one": [(1, 10.0), (2, 8.0), (4, float("nan"))], "b: two": [(1, 10.0), (3, 9.0), (9, 12.0)]}


def test_line_plot_writes_a_png_and_refuses_to_overwrite(tmp_path):
    path = tmp_path / "plot.png"
    assert line_plot(SERIES, path, "a title with spaces", "x", "y", logx=True) == path
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    image = Image.open(path)
    assert image.size == (1200, 675)
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    assert (np.ptp(pixels, axis=1) > 100).sum() > 500  # coloured lines were drawn, not only black text
    with pytest.raises(OutputExistsError):
        line_plot(SERIES, path, "other", "x", "y")
    assert path.read_bytes() == data
    line_plot(SERIES, path, "other", "x", "y", overwrite=True)
    assert path.read_bytes() != data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]  # no temp files left behind


def test_line_plot_rejects_what_it_cannot_draw(tmp_path):
    with pytest.raises(ValueError, match="no finite points"):
        line_plot({"a": [(1, float("inf"))]}, tmp_path / "p.png", "t", "x", "y")
    with pytest.raises(ValueError, match="log x"):
        line_plot({"a": [(0, 1.0), (1, 2.0)]}, tmp_path / "p.png", "t", "x", "y", logx=True)
    assert not list(tmp_path.iterdir())


def test_line_plot_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes the import fail
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserInputError) as err:
        line_plot(SERIES, tmp_path / "p.png", "t", "x", "y")
    message = str(err.value)
    assert "pip install 'cmboost[report]'" in message and "\n" not in message
    assert not (tmp_path / "p.png").exists()


def frontier_point(route, nfe, fid):
    return {"route": route, "nfe": nfe, "judges": {"j": {"fid": fid}}}


def test_frontier_series_starts_the_boosting_route_at_the_one_step_sample():
    frontier = {"CT": [frontier_point("generator steps", 1, 50.0), frontier_point("generator steps", 2, 40.0),
                       frontier_point("1 step + joint PGD", 3, 45.0)]}
    assert frontier_series(frontier, "j") == {"CT: generator steps": [(1, 50.0), (2, 40.0)],
                                              "CT: 1 step + joint PGD": [(1, 50.0), (3, 45.0)]}


def test_amplified_difference_is_black_where_nothing_changed_and_clips():
    before = np.array([[[[10, 200, 0, 255]]]], np.uint8)
    after = np.array([[[[10, 190, 3, 0]]]], np.uint8)
    assert amplified_difference(before, after, gain=8).tolist() == [[[[0, 80, 24, 255]]]]
    assert amplified_difference(after, before, gain=8).tolist() == [[[[0, 80, 24, 255]]]]  # symmetric, no wrap
