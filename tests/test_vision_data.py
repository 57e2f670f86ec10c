"""Images for the vision family: exact per-pixel classes of drawn scenes, image folders with
stray files, any image size and mode, and multi-crop views that are a function of
(seed, step, image) only."""
import json
import warnings

import numpy as np
import pytest
from PIL import Image

from taichu.images import CLIP_MEAN, CLIP_STD
from taichu.imagetext import COLOURS, SHAPES, Pair, draw_scene, make_scene
from taichu.vision_data import (SEGMENT_CLASSES, MultiCrop, ViewBatches, image_folder, load_images,
                                random_resized_box, segmentation_target)

CROP = MultiCrop(global_size=24, local_size=12, num_local=3)


def test_scene_classes_are_the_drawn_pixels_exactly():
    """Every non-white pixel of a drawn scene is a shape pixel and carries the class of the
    shape whose colour it has; white pixels are background (scenes never draw white)."""
    for index in range(40):
        scene = make_scene(seed=3, index=index)
        for size in (64, 97):
            pixels = np.asarray(draw_scene(scene, size))
            classes = segmentation_target(Pair(image=None, text="", key="k", scene=scene), size)
            assert classes.shape == (size, size) and classes.dtype == np.uint8
            assert np.array_equal(classes > 0, (pixels != 255).any(axis=-1))
            for obj in scene.objects:
                where = (pixels == COLOURS[obj.colour]).all(axis=-1)
                shapes = {o.shape for o in scene.objects if o.colour == obj.colour}
                allowed = {1 + SHAPES.index(s) for s in shapes}
                assert set(np.unique(classes[where]).tolist()) <= allowed
    assert SEGMENT_CLASSES[0] == "background" and SEGMENT_CLASSES[1:] == SHAPES


def test_only_scenes_have_classes():
    digits = load_images("digits").train[0]
    with pytest.raises(ValueError, match="drawn scenes only"):
        segmentation_target(digits, 32)


def test_folder_skips_non_images_with_a_warning_and_reads_any_mode_and_size(tmp_path):
    Image.new("L", (50, 30), 128).save(tmp_path / "grey.png")
    Image.new("RGB", (17, 64), (10, 20, 30)).save(tmp_path / "tall.jpg")
    (tmp_path / "sub").mkdir()
    Image.new("P", (40, 40)).save(tmp_path / "sub" / "palette.gif")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match=r"skipped 1 file\(s\) that are not images: notes.txt"):
        pairs = image_folder(tmp_path)
    assert [p.key for p in pairs] == ["grey.png", "sub/palette.gif", "tall.jpg"]
    batches = ViewBatches(pairs, CROP, num_patches=9, seed=0)
    out = batches.batch([0, 1, 2], step=0)
    assert out["global_views"].shape == (3, 2, 3, 24, 24) and out["local_views"].shape == (3, 3, 3, 12, 12)
    assert out["mask_noise"].shape == (3, 2, 9) and 0 <= out["mask_noise"].min() < out["mask_noise"].max() < 1
    # The grey image stays grey after the RGB conversion: its three channels, un-normalised, agree.
    grey = out["global_views"][0, 0] * np.asarray(CLIP_STD, np.float32)[:, None, None] \
        + np.asarray(CLIP_MEAN, np.float32)[:, None, None]
    assert np.allclose(grey, 128 / 255, atol=1e-6)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="no image files"):
            image_folder(empty)


def test_load_images_mixes_sources_and_splits_by_image(tmp_path):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    lines = [{"image": "a.png", "text": "x"}]
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    data = load_images(["scenes", str(tmp_path / "set.jsonl")], scene_count=50)
    assert len(data.train) + len(data.test) == 51 and data.name == "scenes-0-50+set.jsonl"
    assert not {p.key for p in data.train} & {p.key for p in data.test}
    assert load_images(["scenes"], scene_count=50).fingerprint != data.fingerprint


def test_random_resized_box_follows_the_scale_and_ratio():
    rng = np.random.default_rng(0)
    for width, height in ((64, 64), (200, 50), (33, 90)):
        for _ in range(200):
            left, top, w, h = random_resized_box(width, height, (0.4, 1.0), rng)
            assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
            if not (left == (width - w) // 2 and top == (height - h) // 2):  # not the fallback
                # Rounding w and h to whole pixels moves the area by at most w + h + 1.
                assert 0.4 * width * height - (w + h + 1) <= w * h <= width * height
                assert 3 / 4 - 1 / min(w, h) <= w / h <= 4 / 3 + 1 / min(w, h)


def test_views_depend_on_seed_step_and_image_only():
    pairs = load_images("scenes", scene_count=30).train
    batches = ViewBatches(pairs, CROP, num_patches=9, seed=7)
    alone = batches.batch([5], step=3)
    mixed = batches.batch([2, 5, 9], step=3)
    # Ten images: a small crop of one white-backed scene may be all background at two steps.
    ten = batches.batch(range(10), step=3)
    for key in ("global_views", "local_views", "mask_noise"):
        assert np.array_equal(alone[key][0], mixed[key][1]), key
        assert not np.array_equal(batches.batch(range(10), step=4)[key], ten[key]), key
        assert not np.array_equal(ViewBatches(pairs, CROP, 9, seed=8).batch(range(10), step=3)[key], ten[key]), key
        assert np.array_equal(batches.batch([5])[key], batches.batch([5])[key]), key
    # The two global views differ (two crops), and so do their masking draws.
    assert not np.array_equal(alone["global_views"][0, 0], alone["global_views"][0, 1])
    assert not np.array_equal(alone["mask_noise"][0, 0], alone["mask_noise"][0, 1])
    none = ViewBatches(pairs, MultiCrop(global_size=24, local_size=12, num_local=0)).batch([1, 2], step=0)
    assert none["local_views"].shape == (2, 0, 3, 12, 12) and none["mask_noise"].shape == (2, 2, 0)


def test_bad_crop_settings_are_refused():
    with pytest.raises(ValueError, match="global_scale"):
        MultiCrop(global_size=24, local_size=12, num_local=2, global_scale=(0.5, 1.2))
    with pytest.raises(ValueError, match="num_local"):
        MultiCrop(global_size=24, local_size=12, num_local=-1)
