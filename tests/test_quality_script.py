"""scripts/quality.py's metric functions (the model runs are not tested here: see docs/quality.md)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "quality.py"
_spec = importlib.util.spec_from_file_location("quality_script", _PATH)
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def test_mask_iou():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert quality.mask_iou(a, b) == 1.0  # both empty
    a[:2] = True  # 8 pixels
    assert quality.mask_iou(a, b) == 0.0
    b[1:3] = True  # 8 pixels, 4 shared
    assert quality.mask_iou(a, b) == pytest.approx(4 / 12)
    assert quality.mask_iou(a, a) == 1.0


def test_grid_points_are_cell_centres_row_by_row():
    pts = quality.grid_points(600, 400, 2)
    assert pts.dtype == np.float32 and pts.shape == (4, 2)
    np.testing.assert_array_equal(pts, [[150, 100], [450, 100], [150, 300], [450, 300]])
    np.testing.assert_array_equal(quality.grid_points(600, 400, 1), [[300, 200]])  # verify's default prompt


def test_mask_box():
    m = np.zeros((10, 20), bool)
    assert quality.mask_box(m) is None
    m[2:5, 7:9] = True
    m[6, 3] = True
    assert quality.mask_box(m) == (3.0, 2.0, 9.0, 7.0)  # x0, y0, x1, y1 with x1, y1 exclusive


def test_summarize_and_bar():
    ious = np.linspace(0.0, 1.0, 101)  # 0.00, 0.01, ..., 1.00
    s = quality.summarize(ious, [0.0, 0.5] + [0.1] * 99)
    assert s["masks"] == 101
    assert s["median_iou"] == pytest.approx(0.5)
    assert s["p5_iou"] == pytest.approx(0.05)
    assert s["worst_iou"] == 0.0
    assert s["median_iou_pred_err"] == pytest.approx(0.1)
    assert s["max_iou_pred_err"] == 0.5
    assert not quality.meets_bar(s)
    assert quality.meets_bar(quality.summarize([1.0] * 19 + [0.85], [0.0] * 20))
    assert not quality.meets_bar(quality.summarize([1.0] * 10 + [0.0], [0.0] * 11))  # p5 too low
    assert quality.summarize([], []) == {"masks": 0} and not quality.meets_bar({"masks": 0})
