"""Framework-free parts of the vision commands: mIoU against a hand count, patch coverage of
drawn scenes, the masked-on-shapes share, the attention picture."""
import numpy as np
import pytest
from PIL import Image

from taichu.imagetext import draw_scene, make_scene, scene_class_map
from taichu.vision_tasks import attention_picture, masked_on_shapes, mean_iou, patch_coverage


def test_mean_iou_by_hand():
    target = np.array([[0, 0, 1, 1], [0, 0, 1, 2]])
    predicted = np.array([[0, 1, 1, 1], [0, 0, 2, 2]])
    # class 0: 3 shared, union 4; class 1: 2 shared, union 4; class 2: 1 shared, union 2.
    result = mean_iou(predicted, target, num_classes=4)
    assert result["per_class"][:3] == [0.75, 0.5, 0.5] and np.isnan(result["per_class"][3])
    assert result["mean"] == pytest.approx((0.75 + 0.5 + 0.5) / 3)
    assert mean_iou(target, target, 3)["mean"] == 1.0
    with pytest.raises(ValueError, match="0..2"):
        mean_iou(target, target + 1, 3)
    with pytest.raises(ValueError, match="shape"):
        mean_iou(target[:1], target, 3)


def test_patch_coverage_and_masked_on_shapes():
    scene = make_scene(seed=0, index=4)
    classes = scene_class_map(scene, 64)
    coverage = patch_coverage(classes, 8)
    assert coverage.shape == (64,) and coverage.min() >= 0 and coverage.max() <= 1
    assert coverage.mean() == pytest.approx((classes > 0).mean())   # equal-sized patches
    on = coverage > 0.5
    assert 0 < on.sum() < 64
    assert masked_on_shapes([on], [classes], 8, threshold=0.5) == 1.0
    assert masked_on_shapes([~on], [classes], 8, threshold=0.5) == 0.0
    touching = coverage > 0                      # the default: any shape pixel
    assert (touching & ~on).any()
    assert masked_on_shapes([touching & ~on], [classes], 8) == 1.0
    assert masked_on_shapes([~touching], [classes], 8) == 0.0
    assert np.isnan(masked_on_shapes([np.zeros(64, bool)], [classes], 8))
    with pytest.raises(ValueError, match="whole number"):
        patch_coverage(classes, 7)


def test_attention_picture_panels():
    image = draw_scene(make_scene(seed=0, index=1), 64)
    attention = np.zeros((4, 4))
    attention[1, 2] = 1.0
    mask = np.zeros(16, bool)
    mask[0] = True
    picture = attention_picture(image, attention.reshape(-1), mask, size=64)
    assert picture.size == (3 * 64 + 2 * 4, 64)
    pixels = np.asarray(picture).astype(int)
    heat = pixels[:, 68:132]
    # The most attended patch (row 1, col 2) is tinted red; an unattended one is the image.
    assert heat[16:32, 32:48, 0].mean() > heat[16:32, 32:48, 1:].mean() + 50
    assert np.array_equal(heat[48:, :16], pixels[48:, :16])
    masked = pixels[:, 136:]
    assert np.abs(masked[:16, :16] - 128).max() <= 0.25 * 255 + 1   # greyed
    assert np.array_equal(masked[16:, 16:], pixels[16:, 16:64])
    assert attention_picture(image, attention).size == (2 * 224 + 4, 224)
    with pytest.raises(ValueError, match="square grid"):
        attention_picture(image, np.ones(15))
    with pytest.raises(ValueError, match="differs"):
        attention_picture(image, attention, np.ones(4, bool))


def test_greyscale_and_odd_sized_images_are_drawn():
    grey = Image.new("L", (30, 50), 200)
    assert attention_picture(grey, np.ones(9), size=32).size == (2 * 32 + 4, 32)
