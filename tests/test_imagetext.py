import io
import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from taichu.config import TokenizerConfig
from taichu.images import CLIP_MEAN, CLIP_STD, crop_and_resize, load_image, preprocess, resized_size
from taichu.imagetext import (CHINESE_DIGITS, COLOURS, DIGIT_TEMPLATES, WHITE, Pair, Scene,
                              SceneObject, caption_ids, caption_texts, digit_caption, digit_prompts,
                              digit_texts, digits_pairs, draw_scene, load_image_text, make_scene,
                              pairs_fingerprint, read_jsonl, scene_caption, scene_difference,
                              scene_pairs, scene_texts, split_pairs)
from taichu.tokenizer import train_tokenizer
from tolerance import float32_tolerance

# Captions use about 60 distinct characters: with the 4 special and 256 byte pieces a
# vocabulary of 321 is the minimum; a little above it stays (almost) character level.
CAPTION_VOCAB = 330


def normalised(rgb):
    """What preprocess must give for one pixel of colour ``rgb``, by the documented formula."""
    x = np.asarray(rgb, np.float32) / np.float32(255)
    return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def png_bytes(image, **params):
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **params)
    return buffer.getvalue()


# ------------------------------------------------------------------------ preprocessing


def test_solid_colour_gives_exactly_the_normalised_colour():
    colour = (200, 100, 50)
    out = preprocess(Image.new("RGB", (45, 30), colour), 16)
    assert out.shape == (1, 3, 16, 16) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out[0], np.broadcast_to(normalised(colour)[:, None, None], (3, 16, 16)))


def test_two_to_one_image_is_resized_by_its_short_side_and_center_cropped():
    stripes = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 0)]  # A B C D, 20 px each
    wide = np.zeros((40, 80, 3), np.uint8)
    for i, colour in enumerate(stripes):
        wide[:, 20 * i:20 * (i + 1)] = colour
    assert resized_size(80, 40, 20) == (40, 20)
    # 80x40 -> 40x20 (stripes 10 px), crop columns 10..30: the B and C stripes only.
    out = preprocess(wide, 20)[0]
    np.testing.assert_array_equal(out[:, :, 3], np.broadcast_to(normalised(stripes[1])[:, None], (3, 20)))
    np.testing.assert_array_equal(out[:, :, 15], np.broadcast_to(normalised(stripes[2])[:, None], (3, 20)))
    assert np.all(out == out[:, :1, :])  # every row identical: only the width was cropped
    # The same picture turned on its side: the crop is vertical.
    tall = np.ascontiguousarray(wide.transpose(1, 0, 2))
    out_tall = preprocess(tall, 20)[0]
    np.testing.assert_array_equal(out_tall, out.transpose(0, 2, 1))


def test_odd_surplus_crop_is_floored_and_arithmetic_is_as_documented():
    # Shorter side already 10: the resize is a no-op; 21 - 10 = 11 surplus -> left = 5.
    pixels = np.random.default_rng(0).integers(0, 256, (10, 21, 3), dtype=np.uint8)
    np.testing.assert_array_equal(crop_and_resize(Image.fromarray(pixels), 10), pixels[:, 5:15])
    expected = (pixels[:, 5:15].astype(np.float32) / np.float32(255)
                - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    np.testing.assert_array_equal(preprocess(pixels, 10)[0], expected.transpose(2, 0, 1))
    # Custom statistics.
    out = preprocess(Image.new("RGB", (4, 4), (255, 0, 51)), 4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.1))
    np.testing.assert_allclose(out[0, :, 0, 0], [1.0, -2.0, -3.0], rtol=1e-6)


def test_matches_hugging_face_clip_image_processor():
    """Independent oracle: transformers' pillow CLIP processor at our size."""
    transformers = pytest.importorskip("transformers")
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None)
    if processor_class is None:
        pytest.skip("this transformers has no pillow CLIP image processor")
    rng = np.random.default_rng(1)
    for width, height, size in [(37, 23, 16), (23, 37, 16), (7, 9, 16), (301, 99, 64), (48, 48, 48)]:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        processor = processor_class(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        expected = processor(images=[Image.fromarray(pixels)], return_tensors="np")["pixel_values"]
        # Three float32 steps each way (scale, subtract the mean, divide by the std), the last
        # magnifying the first two's rounding by 1 / std: tests/tolerance.py.
        np.testing.assert_allclose(preprocess(pixels, size), expected, rtol=0,
                                   atol=float32_tolerance(1 / min(CLIP_STD), 3))


def test_sources_and_batches(tmp_path):
    rng = np.random.default_rng(2)
    pixels = [rng.integers(0, 256, (30 + 7 * i, 40, 3), dtype=np.uint8) for i in range(3)]
    path = tmp_path / "a.png"
    Image.fromarray(pixels[0]).save(path)
    as_path = preprocess(path, 24)
    for source in (str(path), path.read_bytes(), pixels[0], Image.fromarray(pixels[0])):
        out = preprocess(source, 24)
        np.testing.assert_array_equal(out, as_path)
    batch = preprocess([path] + [Image.fromarray(p) for p in pixels[1:]], 24)
    assert batch.shape == (3, 3, 24, 24)
    np.testing.assert_array_equal(batch[0], as_path[0])
    np.testing.assert_array_equal(batch[2], preprocess(pixels[2], 24)[0])
    assert preprocess([], 24).shape == (0, 3, 24, 24)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="image_size"):
            preprocess(pixels[0], bad)
    with pytest.raises(ValueError, match="std"):
        preprocess(pixels[0], 8, std=(0.1, 0.0, 0.1))
    with pytest.raises(ValueError, match="mean"):
        preprocess(pixels[0], 8, mean=(0.1, 0.2))
    with pytest.raises(ValueError, match="uint8"):
        preprocess(pixels[0].astype(np.float32), 8)


def test_identical_arrays_in_another_process(tmp_path):
    """ONNX inference runs preprocess in its own process: same file, same bytes.
    The core modules must also load without torch or mindspore."""
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (53, 71, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    code = ("import sys, numpy as np; import taichu.images, taichu.imagetext; "
            "assert 'torch' not in sys.modules and 'mindspore' not in sys.modules; "
            f"np.save({str(tmp_path / 'x.npy')!r}, "
            f"taichu.images.preprocess({str(tmp_path / 'x.png')!r}, 32))")
    subprocess.run([sys.executable, "-c", code], check=True)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), preprocess(tmp_path / "x.png", 32))


def test_grey_scale_palette_rgba_cmyk_and_16_bit_are_converted(tmp_path):
    grey = Image.fromarray(np.array([[0, 100, 255]], np.uint8), mode="L")
    (tmp_path / "grey.png").write_bytes(png_bytes(grey))
    rgb = np.asarray(load_image(tmp_path / "grey.png"))
    assert rgb.shape == (1, 3, 3)
    np.testing.assert_array_equal(rgb, np.repeat(np.array([[0, 100, 255]], np.uint8)[..., None], 3, axis=2))
    np.testing.assert_array_equal(preprocess(grey, 3), preprocess(grey.convert("RGB"), 3))

    # RGBA: opaque keeps its colour, transparent becomes white, half transparent is blended.
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(10, 20, 30, 255), (10, 20, 30, 0), (255, 0, 0, 128)])
    np.testing.assert_array_equal(np.asarray(load_image(png_bytes(rgba)))[0],
                                  [[10, 20, 30], [255, 255, 255], [255, 127, 127]])
    la = Image.new("LA", (1, 1), (0, 0))
    np.testing.assert_array_equal(np.asarray(load_image(la))[0, 0], WHITE)

    # Palette, with and without a transparent index.
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.putpixel((1, 0), 1)
    np.testing.assert_array_equal(np.asarray(load_image(png_bytes(palette)))[0], [[255, 0, 0], [0, 0, 255]])
    np.testing.assert_array_equal(np.asarray(load_image(png_bytes(palette, transparency=1)))[0],
                                  [[255, 0, 0], [255, 255, 255]])

    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))
    np.testing.assert_array_equal(np.asarray(load_image(cmyk))[0, 0], [255, 0, 0])
    sixteen = Image.fromarray(np.array([[0, 257, 32896, 65535]], np.uint16))
    assert Image.open(io.BytesIO(png_bytes(sixteen))).mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(load_image(png_bytes(sixteen)))[0, :, 0], [0, 1, 128, 255])
    for image in (grey, rgba, palette, cmyk, sixteen):
        assert load_image(image).mode == "RGB"


def test_non_image_and_truncated_files_are_refused_by_name(tmp_path):
    fake = tmp_path / "x.png"
    fake.write_text("this is not a picture\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"x\.png.*not a readable image"):
        load_image(fake)
    with pytest.raises(ValueError, match=r"x\.png"):
        preprocess([fake], 8)
    noise = Image.fromarray(np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for name, fmt in (("cut.png", "PNG"), ("cut.jpg", "JPEG")):
        buffer = io.BytesIO()
        noise.save(buffer, fmt)
        data = buffer.getvalue()
        (tmp_path / name).write_bytes(data[:len(data) // 2])
        with pytest.raises(ValueError, match=name.replace(".", r"\.") + ".*truncated"):
            load_image(tmp_path / name)
    with pytest.raises(ValueError, match="bytes"):
        load_image(b"GIF89a but not really")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")


# ------------------------------------------------------------------------ digits


@pytest.fixture(scope="module")
def digits():
    return digits_pairs()


def test_digits_pairs_are_the_sklearn_digits_with_matching_captions(digits):
    from sklearn.datasets import load_digits

    reference = load_digits()
    assert len(digits) == 1797
    assert [p.label for p in digits] == reference.target.tolist()
    templates_used = Counter()
    for pair in digits:
        options = {digit_caption(pair.label, t): t for t in DIGIT_TEMPLATES}
        assert pair.text in options, pair.text
        templates_used[options[pair.text]] += 1
        # The caption names this digit and no other ("一个", "一张" are measure words).
        text = pair.text.replace("一个", "").replace("一张", "")
        named = {d for d in range(10) if CHINESE_DIGITS[d] in text or str(d) in text}
        assert named == {pair.label}, pair.text
    assert set(templates_used) == set(DIGIT_TEMPLATES)
    assert min(templates_used.values()) > 200  # spread over the templates, not one of them
    assert any(CHINESE_DIGITS[7] in p.text for p in digits if p.label == 7)
    assert any("7" in p.text for p in digits if p.label == 7)
    # Images: 32x32 RGB, black ink on white, 4x4 blocks of the 8x8 grid, exact grey levels.
    image = np.asarray(digits[5].image)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert np.all(image[..., 0] == image[..., 1]) and np.all(image[..., 1] == image[..., 2])
    expected = np.rint(255 * (16 - reference.images[5]) / 16).astype(np.uint8)
    np.testing.assert_array_equal(image[::4, ::4, 0], expected)
    np.testing.assert_array_equal(image[3::4, 3::4, 0], expected)
    assert [p.key for p in digits[:2]] == ["digits:0", "digits:1"]


def test_digit_prompts():
    assert digit_prompts()[7] == "手写的数字七"
    assert digit_prompts("一张数字{ar}的图片")[0] == "一张数字0的图片"
    assert len(set(digit_prompts())) == 10
    assert len(digit_texts()) == 60 and "黑白手写数字：七" in digit_texts()
    with pytest.raises(ValueError):
        digit_caption(10)


def test_digits_split_is_deterministic_disjoint_and_stable(digits):
    train, test = split_pairs(digits, 0.2, seed=0)
    train2, test2 = split_pairs(digits_pairs(), 0.2, seed=0)
    assert [p.key for p in train] == [p.key for p in train2]
    assert [p.key for p in test] == [p.key for p in test2]
    assert not {p.key for p in train} & {p.key for p in test}
    assert len(train) + len(test) == 1797
    assert 0.16 < len(test) / 1797 < 0.24
    train_keys = {p.key for p in train}
    assert [p.key for p in train] == [p.key for p in digits if p.key in train_keys]  # order kept
    # Every digit is on both sides.
    assert {p.label for p in test} == set(range(10))
    other = split_pairs(digits, 0.2, seed=1)[1]
    assert {p.key for p in other} != {p.key for p in test}
    # The split of a pair depends only on its key: a subset splits the same way.
    sub_train, sub_test = split_pairs(digits[:500], 0.2, seed=0)
    assert {p.key for p in sub_test} == {p.key for p in test if int(p.key.split(":")[1]) < 500}


def test_load_image_text_digits_and_fingerprint():
    data = load_image_text("digits", test_fraction=0.2, seed=0)
    again = load_image_text("digits", test_fraction=0.2, seed=0)
    assert data.name == "digits" and len(data.train) + len(data.test) == 1797
    assert data.fingerprint == again.fingerprint and len(data.fingerprint) == 64
    assert load_image_text("digits", test_fraction=0.2, seed=1).fingerprint != data.fingerprint
    assert load_image_text("digits", test_fraction=0.2, seed=0, image_size=16).fingerprint != data.fingerprint
    with pytest.raises(ValueError, match="expected 'digits', 'scenes'"):
        load_image_text("mnist")
    with pytest.raises(ValueError, match="test_fraction"):
        load_image_text("digits", test_fraction=1.0)


def test_split_keeps_captions_of_one_image_together_and_both_sides_filled():
    image = Image.new("RGB", (1, 1))
    pairs = [Pair(image, f"caption {i}", key=f"img{i % 7}") for i in range(70)]
    train, test = split_pairs(pairs, 0.3, seed=0)
    assert not {p.key for p in train} & {p.key for p in test}
    assert len(test) % 10 == 0 and len(train) % 10 == 0
    for fraction in (0.01, 0.99):  # two keys: both sides get one, whatever the fraction
        train, test = split_pairs(pairs[:2], fraction, seed=0)
        assert len(train) == 1 and len(test) == 1
    assert pairs_fingerprint(pairs, 0.3, 0) != pairs_fingerprint(pairs[:-1], 0.3, 0)


# ------------------------------------------------------------------------ scenes

SIZE = 96


def components(image: np.ndarray):
    """(colour, mask) of every connected blob of one non-white colour."""
    from scipy import ndimage

    blobs = []
    for name, rgb in COLOURS.items():
        labels, count = ndimage.label(np.all(image == rgb, axis=-1))
        blobs += [(name, labels == i) for i in range(1, count + 1)]
    return blobs


def shape_of(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "正方形" if fill > 0.95 else "圆形" if fill > 0.62 else "三角形"


def in_position(mask: np.ndarray, position: str, layout: str) -> bool:
    ys, xs = np.nonzero(mask)
    third, half = SIZE / 3, SIZE / 2
    if layout == "row":
        return {"左边": xs.max() < third, "中间": third <= xs.min() and xs.max() < 2 * third,
                "右边": xs.min() >= 2 * third}[position]
    return {"左边": xs.max() < half, "右边": xs.min() >= half, "上面": ys.max() < half,
            "下面": ys.min() >= half,
            "中间": abs(xs.mean() - half) < 0.1 * SIZE and abs(ys.mean() - half) < 0.1 * SIZE}[position]


@pytest.fixture(scope="module")
def scenes():
    return scene_pairs(200, seed=0, image_size=SIZE)


def test_scene_pixels_show_exactly_what_the_caption_says(scenes):
    """Find every blob in the picture by its colour, tell its shape from how much of its
    bounding box it fills, and match the blobs one to one with the caption's objects."""
    assert {p.scene.layout for p in scenes} == {"count", "single", "pair", "row"}
    for pair in scenes:
        image, scene = np.asarray(pair.image), pair.scene
        assert pair.text == scene_caption(scene)
        colours = {tuple(c) for c in image.reshape(-1, 3)}
        assert colours == {WHITE} | {COLOURS[o.colour] for o in scene.objects}, pair.text
        for o in scene.objects:
            assert o.colour in pair.text and o.shape in pair.text and (o.position or "") in pair.text
        blobs = components(image)
        assert len(blobs) == len(scene.objects), pair.text
        unmatched = list(range(len(blobs)))
        for o in scene.objects:
            match = next((i for i in unmatched if blobs[i][0] == o.colour and shape_of(blobs[i][1]) == o.shape
                          and (o.position is None or in_position(blobs[i][1], o.position, scene.layout))),
                         None)
            assert match is not None, (pair.key, pair.text, o)
            unmatched.remove(match)
        if scene.layout == "count":
            number = {1: "一", 2: "两", 3: "三"}[len(scene.objects)]
            assert f"{number}个{scene.objects[0].colour}的{scene.objects[0].shape}" in pair.text


def test_a_red_circle_on_the_left_by_hand():
    scene = Scene("single", (SceneObject("圆形", "红色", "左边"),), geometry=((0.25, 0.5, 0.15),))
    assert scene_caption(scene) == "左边有一个红色的圆形"
    image = np.asarray(draw_scene(scene, 100))
    red = np.all(image == COLOURS["红色"], axis=-1)
    assert red[50, 25] and not red[50, 75] and red.sum() + np.all(image == WHITE, axis=-1).sum() == 100 * 100
    assert abs(red.sum() - np.pi * 15 ** 2) < 0.1 * np.pi * 15 ** 2


def test_scenes_are_deterministic_for_a_seed_and_differ_across_seeds(scenes):
    again = scene_pairs(200, seed=0, image_size=SIZE)
    assert [p.text for p in again] == [p.text for p in scenes]
    assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(again, scenes))
    assert [p.scene for p in again] == [p.scene for p in scenes]
    # The first n scenes do not depend on how many are asked for, nor on the drawing size.
    prefix = scene_pairs(20, seed=0, image_size=SIZE)
    assert [p.image.tobytes() for p in prefix] == [p.image.tobytes() for p in scenes[:20]]
    assert [p.text for p in scene_pairs(20, seed=0, image_size=48)] == [p.text for p in scenes[:20]]
    assert scene_texts(200, seed=0) == [p.text for p in scenes]
    other = scene_pairs(200, seed=1, image_size=SIZE)
    assert sum(a.text != b.text for a, b in zip(other, scenes)) > 150
    assert sum(a.image.tobytes() != b.image.tobytes() for a, b in zip(other, scenes)) > 190
    assert len({p.text for p in scenes}) > 120
    with pytest.raises(ValueError, match="image_size"):
        scene_pairs(3, image_size=16)
    with pytest.raises(ValueError, match="count"):
        scene_pairs(0)


def test_scene_difference_counts_changed_objects():
    scene = make_scene(0, 8)  # a row of three
    assert scene.layout == "row"
    assert scene_difference(scene, scene) == 0
    first, *rest = scene.objects
    recoloured = Scene(scene.layout, (SceneObject(first.shape, "黄色" if first.colour != "黄色" else "红色",
                                                  first.position), *rest))
    assert scene_difference(scene, recoloured) == 2 and recoloured != scene
    assert scene_caption(recoloured) != scene_caption(scene)
    two = Scene("count", (SceneObject("圆形", "红色", None),) * 2)
    three = Scene("count", (SceneObject("圆形", "红色", None),) * 3)
    assert scene_caption(two) == "白色背景上有两个红色的圆形" and scene_difference(two, three) == 1


def test_scene_split():
    data = load_image_text("scenes", test_fraction=0.25, seed=0, scene_count=100)
    assert len(data.train) + len(data.test) == 100 and 10 < len(data.test) < 40
    again = load_image_text("scenes", test_fraction=0.25, seed=0, scene_count=100)
    assert data.fingerprint == again.fingerprint
    assert data.fingerprint != load_image_text("scenes", test_fraction=0.25, seed=0, scene_count=100,
                                               scene_seed=1).fingerprint
    both = load_image_text(["digits", "scenes"], test_fraction=0.25, seed=0, scene_count=100)
    assert both.name == "digits+scenes-0-100" and len(both.train) + len(both.test) == 1897
    # A pair's side does not depend on the other sources.
    assert [p.key for p in both.test if p.key.startswith("scenes")] == [p.key for p in data.test]


# ------------------------------------------------------------------------ jsonl


def write_images(folder):
    (folder / "img").mkdir()
    Image.new("RGB", (20, 10), (255, 0, 0)).save(folder / "img" / "red.png")
    Image.new("L", (10, 10), 128).save(folder / "img" / "grey.png")
    return folder / "img" / "red.png", folder / "img" / "grey.png"


def test_read_jsonl_happy_path(tmp_path):
    red, grey = write_images(tmp_path)
    lines = [json.dumps({"image": "img/red.png", "text": "一张红色的图片", "id": 17}, ensure_ascii=False),
             "",
             json.dumps({"image": str(grey), "text": "灰色", "label": 3}, ensure_ascii=False),
             json.dumps({"image": "img/red.png", "text": "红色"}, ensure_ascii=False)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    pairs = read_jsonl(path, verify=True)
    assert [p.text for p in pairs] == ["一张红色的图片", "灰色", "红色"]
    assert [p.label for p in pairs] == [None, 3, None]
    assert pairs[0].image == red and pairs[1].image == grey
    assert pairs[0].key == pairs[2].key == "img/red.png"
    assert pairs[0].load().size == (20, 10) and pairs[1].load().mode == "RGB"
    batch = preprocess([p.image for p in pairs], 8)
    np.testing.assert_array_equal(batch[0, :, 4, 4], normalised((255, 0, 0)))
    np.testing.assert_array_equal(batch[1, :, 4, 4], normalised((128, 128, 128)))
    data = load_image_text(path, test_fraction=0.5, seed=0)
    assert data.name == "pairs.jsonl" and len(data.train) + len(data.test) == 3
    # The two captions of red.png are on the same side.
    assert len({p.key for p in data.train} & {p.key for p in data.test}) == 0


@pytest.mark.parametrize("line, message", [
    ('{"image": "img/red.png", "text": "红"', "not valid JSON"),
    ('["img/red.png", "红"]', "expected a JSON object"),
    ('{"text": "红"}', "missing key 'image'"),
    ('{"image": "img/red.png"}', "missing key 'text'"),
    ('{"image": "img/red.png", "text": 5}', "'text' must be a string"),
    ('{"image": "img/red.png", "text": "  "}', "empty text"),
    ('{"image": "img/none.png", "text": "红"}', r"image file .*none\.png not found"),
    ('{"image": "img/red.png", "text": "红", "label": true}', "'label' must be an integer"),
    ('{"image": "notes.png", "text": "红"}', r"notes\.png: not a readable image"),
])
def test_read_jsonl_errors_name_file_and_line(tmp_path, line, message):
    write_images(tmp_path)
    (tmp_path / "notes.png").write_text("not an image", encoding="utf-8")
    path = tmp_path / "bad.jsonl"
    path.write_text('{"image": "img/grey.png", "text": "灰色"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:2: .*{message}"):
        read_jsonl(path, verify=True)


def test_read_jsonl_empty_and_missing(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no image-text pairs"):
        read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        read_jsonl(tmp_path / "nothing.jsonl")
    (tmp_path / "latin.jsonl").write_bytes(b'{"image": "a.png", "text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin\.jsonl: not UTF-8"):
        read_jsonl(tmp_path / "latin.jsonl")


# ------------------------------------------------------------------------ caption tokens


@pytest.fixture(scope="module")
def caption_tokenizer(tmp_path_factory):
    texts = caption_texts(scene_texts(300, seed=0), digit_texts())
    return train_tokenizer(texts, TokenizerConfig(character_coverage=1.0), CAPTION_VOCAB,
                           tmp_path_factory.mktemp("captions") / "tokenizer.model")


def test_caption_texts_for_the_tokenizer(scenes):
    texts = list(caption_texts(scenes[:3], ["", "  ", "手写的数字七"]))
    assert texts == [p.text for p in scenes[:3]] + ["手写的数字七"]
    with pytest.raises(TypeError):
        list(caption_texts([3]))


def test_caption_ids_pad_and_round_trip(caption_tokenizer):
    tok = caption_tokenizer
    assert tok.vocab_size == CAPTION_VOCAB
    texts = ["手写的数字七", "左边一个蓝色的正方形，右边一个黄色的三角形", "一张数字7的图片"]
    ids, mask = caption_ids(tok, texts, 32)
    assert ids.shape == mask.shape == (3, 32) and ids.dtype == mask.dtype == np.int64
    for row, text in enumerate(texts):
        n = int(mask[row].sum())
        assert np.all(mask[row, :n] == 1) and np.all(mask[row, n:] == 0)
        assert ids[row, 0] == tok.bos_id and ids[row, n - 1] == tok.eos_id
        assert np.all(ids[row, n:] == tok.pad_id)
        assert ids[row, 1:n - 1].tolist() == tok.encode(text)
        assert tok.decode(ids[row, :n]) == text and tok.unk_id not in ids[row]
    # A caption that exactly fills the context is not cut.
    exact = len(tok.encode(texts[1])) + 2
    full, full_mask = caption_ids(tok, texts[1:2], exact)
    assert full_mask.all() and tok.decode(full[0]) == texts[1]


def test_caption_longer_than_context_is_truncated_keeping_eos(caption_tokenizer):
    tok = caption_tokenizer
    long = "，".join(scene_texts(10, seed=0))
    assert len(tok.encode(long)) > 12
    ids, mask = caption_ids(tok, [long, "这是数字三"], 12)
    assert mask[0].all()
    assert ids[0, 0] == tok.bos_id and ids[0, -1] == tok.eos_id
    assert ids[0, 1:-1].tolist() == tok.encode(long)[:10]
    assert long.startswith(tok.decode(ids[0]))
    assert mask[1].sum() == len(tok.encode("这是数字三")) + 2


def test_caption_ids_refuses_empty_captions_and_tiny_contexts(caption_tokenizer):
    with pytest.raises(ValueError, match="caption 1 is empty"):
        caption_ids(caption_tokenizer, ["这是数字三", ""], 16)
    with pytest.raises(ValueError, match="caption 0 is empty"):
        caption_ids(caption_tokenizer, [" \n"], 16)
    with pytest.raises(ValueError, match="context_length"):
        caption_ids(caption_tokenizer, ["这是数字三"], 2)
    with pytest.raises(TypeError):
        caption_ids(caption_tokenizer, "这是数字三", 16)
    ids, mask = caption_ids(caption_tokenizer, [], 16)
    assert ids.shape == (0, 16)
