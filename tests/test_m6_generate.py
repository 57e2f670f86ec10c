"""Generation and evaluation with an M6 (taichu/m6_generate.py, taichu/m6_eval.py,
taichu/cli_m6.py) on a tiny random model with perturbed weights (so that logits are far
apart and the image matters): the same greedy text in PyTorch and MindSpore (compiled over a
static cache) for captions, answers and continuations, batch of 1 and of 3; cached
generation is the argmax of full forwards without a cache; the commands run end to end; bad
input is refused; each metric against a value computed by hand."""
import json
import math

import numpy as np
import pytest
from PIL import Image

import taichu
from taichu.families.m6 import CODE, IMAGE, PREFIX, TARGET
from taichu.generate import SamplingConfig
from taichu.m6_eval import (attribute_accuracy, caption_bleu, caption_checks, caption_cider, char_tokens,
                            evaluate_captions, evaluate_vqa, vqa_accuracy)
from taichu.m6_generate import (ask, caption, continue_text, generate_from, imagine_codes, model_step,
                                prompt_batch)
from taichu.cli_m6 import one_line
from taichu.tokenizer import Tokenizer
from conftest import CONFIGS

# Plain colours: the patch features of the three images differ in direction, not only in size.
COLOURS = [(255, 0, 0), (0, 160, 0), (0, 0, 255)]
QUESTIONS = ["左边是什么颜色？", "图中一共有几个形状？", "红色的是什么形状？"]
PROMPTS = ["左边一个", "图中有两个红色的", "右边一个蓝色的正方形，左边"]
GREEDY = SamplingConfig(max_new_tokens=6, temperature=0.0)


def solid(colour, size=32):
    return np.broadcast_to(np.array(colour, np.uint8), (size, size, 3)).copy()


@pytest.fixture(scope="module")
def m6(tmp_path_factory):
    """A tokenizer (vocab 384) trained in-process on scene captions and questions, a random
    image tokenizer (vqvae-tiny: 32 codes, 4 x 4) and an m6-tiny with its codebook and grid,
    weights perturbed by N(0, 1) (code positions 10x), saved as model directories; image files of the model's
    size and of another."""
    import torch

    from taichu.imagetext import make_scene, scene_caption
    from taichu.m6_data import scene_questions
    from taichu.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("m6gen")
    torch.manual_seed(0)
    vq = taichu.save_model(taichu.build_model(taichu.load_config(CONFIGS / "vqvae" / "vqvae-tiny.yaml"), "torch"),
                           root / "vqvae")
    # A vocabulary of 384: its tokenizer trains in about a second on the scene texts.
    config = taichu.load_config(CONFIGS / "m6" / "m6-tiny.yaml", [
        "model.vocab_size=384", "model.codebook_size=32", "model.image_grid=4", f"data.image_tokenizer={vq}"])
    texts = []
    for i in range(300):
        scene = make_scene(0, i)
        texts += [scene_caption(scene)] + [q + a for _, q, a in scene_questions(scene)]
    tokenizer_file = root / "tokenizer.model"
    train_tokenizer(texts, config.tokenizer, config.model.vocab_size, tokenizer_file)
    model = taichu.build_model(config, "torch")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
        model.embed_code_positions.weight.mul_(10.0)     # greedy codes that vary over the grid
    model_dir = taichu.save_model(model, root / "m6", tokenizer=tokenizer_file)
    files = []
    for i, colour in enumerate(COLOURS):
        files.append(root / f"image{i}.png")
        Image.fromarray(solid(colour)).save(files[-1])
    files.append(root / "wide.png")      # another size: the CLI resizes it
    Image.fromarray(solid(COLOURS[2], 48)[:40]).save(files[-1])
    return {"dir": model_dir, "vqvae": vq, "config": taichu.load_config(model_dir), "files": files,
            "tokenizer": Tokenizer(model_dir / "tokenizer.model"), "images": [solid(c) for c in COLOURS]}


@pytest.fixture(scope="module")
def steps(m6):
    """One step per backend for the module (MindSpore: the graphs compile once per shape)."""
    return {backend: model_step(taichu.load_model(m6["dir"], backend)) for backend in ("torch", "mindspore")}


def run(task, step, m6, rows):
    images = [m6["images"][i] for i in rows]
    if task == "caption":
        return caption(step, m6["tokenizer"], m6["config"], images, GREEDY)
    if task == "ask":
        return ask(step, m6["tokenizer"], m6["config"], images, [QUESTIONS[i] for i in rows], GREEDY)
    # continuation: rows 0 and 2 with their image, row 1 without
    return continue_text(step, m6["tokenizer"], m6["config"], [PROMPTS[i] for i in rows],
                         [images[k] if rows[k] != 1 else None for k in range(len(rows))], GREEDY)


@pytest.mark.parametrize("task", ["caption", "ask", "continue"])
def test_same_greedy_text_in_both_backends_and_batches(m6, steps, task):
    tokenizer = m6["tokenizer"]
    lengths = {len(tokenizer.encode(t)) for t in (QUESTIONS if task == "ask" else PROMPTS)}
    assert len(lengths) == 3        # prompts of three lengths: left padding is exercised
    outputs = {backend: run(task, step, m6, [0, 1, 2]) for backend, step in steps.items()}
    assert outputs["torch"] == outputs["mindspore"]
    assert all(outputs["torch"]) and len(set(outputs["torch"])) > 1      # text, depending on the row
    for row in range(3):     # alone: the same as in the batch (left padding is invisible)
        alone = {backend: run(task, step, m6, [row]) for backend, step in steps.items()}
        assert alone["torch"] == alone["mindspore"] == [outputs["torch"][row]]


def test_every_kind_of_step_gives_the_same_tokens(m6, steps):
    """The growing cache (torch eager, MindSpore PyNative) and the static cache (torch eager
    cells, MindSpore compiled: ``steps``) give the same greedy captions and continuations."""
    others = {"torch static": model_step(taichu.load_model(m6["dir"], "torch"), static_cache=True),
              "mindspore pynative": model_step(taichu.load_model(m6["dir"], "mindspore"), static_cache=False)}
    expected = run("continue", steps["torch"], m6, [0, 1, 2])     # rows with and without an image
    for name, step in others.items():
        assert run("continue", step, m6, [0, 1, 2]) == expected, name


def full_text_logits(model, pixel_values, ids, prompt_length):
    """Text logits of one full forward (no cache) over the image, [bos] + prompt and the
    generated tokens as TARGETs."""
    import torch

    patches = 0 if pixel_values is None else model.num_patches
    segments = [IMAGE] * patches + [PREFIX] * prompt_length + [TARGET] * (len(ids) - prompt_length)
    with torch.no_grad():
        logits, _ = model(None if pixel_values is None else torch.from_numpy(pixel_values[None]),
                          torch.tensor([ids]), torch.tensor([segments]))
    return logits[0].numpy()


@pytest.mark.parametrize("task", ["vqa", "caption", "text_continuation"])
def test_cached_generation_is_the_full_forward_argmax(m6, steps, task):
    """Each greedy token (growing cache in torch, static cache in MindSpore: the same ids) is
    the argmax of a cache-free forward over everything before it; a row that stopped early
    stopped at eos."""
    model = taichu.load_model(m6["dir"], "torch")
    tokenizer, config = m6["tokenizer"], m6["config"]
    prompts = {"vqa": QUESTIONS, "caption": [""] * 3, "text_continuation": PROMPTS}[task]
    images = None if task == "text_continuation" else m6["images"]
    batch = prompt_batch(tokenizer, config, images, prompts, task)
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.0)
    new = {b: generate_from(step, tokenizer, config, *batch, sampling) for b, step in steps.items()}
    assert new["torch"] == new["mindspore"]
    room = config.model.text_length - batch[1].shape[1]
    for row, generated in enumerate(new["torch"]):
        prompt = [tokenizer.bos_id] + tokenizer.encode(prompts[row])
        logits = full_text_logits(model, None if images is None else batch[0][row], prompt + generated, len(prompt))
        chosen = logits[len(prompt) - 1:].argmax(-1)
        assert chosen[:len(generated)].tolist() == generated
        if len(generated) < min(12, room):
            assert chosen[len(generated)] == tokenizer.eos_id


def test_image_codes_are_the_full_forward_argmax_and_agree_across_backends(m6, steps):
    import torch

    from taichu.imagine import prompt_ids

    tokenizer, config = m6["tokenizer"], m6["config"]
    prompts = ["左边一个红色的正方形", "两个蓝色的圆形"]
    greedy = SamplingConfig(temperature=0.0)
    codes = imagine_codes(steps["torch"], tokenizer, config, prompts, greedy)
    assert codes.shape == (2, 4, 4) and len(np.unique(codes)) > 1
    sampled = SamplingConfig(temperature=1.0, top_k=8, seed=3)
    assert np.array_equal(imagine_codes(steps["torch"], tokenizer, config, prompts, sampled),
                          imagine_codes(steps["mindspore"], tokenizer, config, prompts, sampled))
    model = taichu.load_model(m6["dir"], "torch")
    for row, prompt in enumerate(prompts):
        ids, _ = prompt_ids(tokenizer, prompt, config.model.text_length)
        flat = codes[row].reshape(1, -1)
        slots = np.concatenate([[[config.model.codebook_size]], flat[:, :-1]], axis=1)
        segments = np.concatenate([np.where(ids != tokenizer.pad_id, PREFIX, 0), np.full_like(slots, CODE)], axis=1)
        with torch.no_grad():
            _, logits = model(None, torch.from_numpy(ids), torch.from_numpy(segments), torch.from_numpy(slots))
        assert np.array_equal(logits.argmax(-1).numpy(), flat)


def cli(capsys, *args):
    from taichu.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_commands_run_end_to_end(m6, steps, capsys, tmp_path):
    files, tokenizer, config = m6["files"], m6["tokenizer"], m6["config"]
    step = steps["torch"]
    from taichu.images import load_image

    loaded = [load_image(f) for f in files]
    code, out, err = cli(capsys, "caption", m6["dir"], *files, "--max-new-tokens", 6)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == len(files)          # one line per image, the other size resized
    expected = caption(step, tokenizer, config, loaded, GREEDY)
    assert lines == [f"{f}\t{one_line(c)}" for f, c in zip(files, expected)]

    code, out, err = cli(capsys, "ask", m6["dir"], files[0], files[3], QUESTIONS[0], "--max-new-tokens", 6)
    assert code == 0, err
    answers = ask(step, tokenizer, config, [loaded[0], loaded[3]], [QUESTIONS[0]] * 2, GREEDY)
    assert out.splitlines() == [f"{files[0]}\t{one_line(answers[0])}", f"{files[3]}\t{one_line(answers[1])}"]

    for image in (files[1], None):
        extra = ["--image", image] if image else []
        code, out, err = cli(capsys, "generate", m6["dir"], "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                             "--temperature", 0, "--max-new-tokens", 6, *extra)
        assert code == 0, err
        rows = None if image is None else [loaded[1]] * 2
        continued = continue_text(step, tokenizer, config, PROMPTS[:2], rows, GREEDY)
        assert out == "".join(f"{p}{c}\n" for p, c in zip(PROMPTS[:2], continued))

    grid = tmp_path / "grid.png"
    code, out, err = cli(capsys, "imagine", m6["dir"], "--prompt", "左边一个红色的正方形，右边一个蓝色的圆形",
                         "--num", 2, "--out", grid, "--seed", 1, "--codes", tmp_path / "codes.npy")
    assert code == 0, err
    summary = json.loads(grid.with_suffix(".json").read_text())
    assert len(summary["checks"]) == 2 and Image.open(grid).size[0] > 0
    sampled = SamplingConfig(max_new_tokens=16, temperature=1.0, seed=1)
    expected_codes = imagine_codes(step, tokenizer, config, ["左边一个红色的正方形，右边一个蓝色的圆形"] * 2, sampled)
    assert np.array_equal(np.load(tmp_path / "codes.npy"), expected_codes)


def test_bad_input_is_refused(m6, steps, capsys):
    tokenizer, config, images = m6["tokenizer"], m6["config"], m6["images"]
    for step in steps.values():
        with pytest.raises(ValueError, match="question 0 has no image"):
            ask(step, tokenizer, config, None, ["左边是什么颜色？"])
        with pytest.raises(ValueError, match="question 1 is empty"):
            ask(step, tokenizer, config, images[:2], ["左边是什么颜色？", "  "])
        with pytest.raises(ValueError, match="prompt 0 is empty"):
            continue_text(step, tokenizer, config, [""])
        with pytest.raises(ValueError, match="prompt 0 has .* tokens.*text_length 24"):
            continue_text(step, tokenizer, config, ["左边一个红色的正方形，右边一个蓝色的圆形" * 12])
        with pytest.raises(ValueError, match="prompt 0 is empty"):
            imagine_codes(step, tokenizer, config, [" "])
        # pixel_values of another size: the model (and the static step before its graphs) refuses them
        with pytest.raises(ValueError, match=r"pixel_values must be \[batch, 3, 32, 32\].*got shape \(1, 3, 40, 40\)"):
            caption(step, tokenizer, config, np.zeros((1, 3, 40, 40), np.float32))
    assert caption(steps["torch"], tokenizer, config, np.zeros((1, 3, 32, 32), np.float32), GREEDY)[0]
    code, _, err = cli(capsys, "ask", m6["dir"], m6["files"][0], " ")
    assert code == 2 and "question is empty" in err
    code, _, err = cli(capsys, "caption", m6["vqvae"], m6["files"][0])
    assert code == 2 and "a vqvae model, not an m6 model" in err
    code, _, err = cli(capsys, "generate", m6["vqvae"], "--image", m6["files"][0], "--prompt", "左边")
    assert code == 2 and "only an m6 model takes an image" in err
    code, _, err = cli(capsys, "caption", m6["dir"], m6["files"][0], "--backend", "onnx")
    assert code == 2 and "is not an ONNX export" in err, err


# ----------------------------------------------------------------------------- metrics


def test_bleu_against_hand_computed_values():
    assert caption_bleu(["左边一个红色的圆形"], ["左边一个红色的圆形"]) == pytest.approx(100.0)
    # Characters as tokens: 9 against 10; matches 8/9 unigrams, 6/8 bigrams, 5/7 trigrams,
    # 4/6 4-grams; brevity penalty exp(1 - 10/9).
    expected = 100 * math.exp(1 - 10 / 9) * (8 / 9 * 6 / 8 * 5 / 7 * 4 / 6) ** 0.25
    assert caption_bleu(["左边一个红色的圆形"], [["左边一个红色的正方形"]]) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="2 captions for 1 reference"):
        caption_bleu(["a", "b"], ["a"])


def test_cider_against_the_formula_by_hand():
    """Two images, one reference each, characters as tokens. Document frequencies over the 2
    reference sets: 红 1, 色 2, 蓝 1, 红色 1, 蓝色 1; idf = log 2 - log max(1, df): 色's is 0,
    the others log 2. Image 1 (红色 vs 红色): unigram cosine 1 (only 红 has weight),
    bigram cosine 1, 3- and 4-grams 0; equal lengths: 10 * mean(1, 1, 0, 0) = 5. Image 2
    (蓝 vs 蓝色): unigram cosine 1, no bigram in the caption; the length is the bigram count
    (0 vs 1, coco-caption's), Gaussian penalty exp(-1 / (2 * 6^2)): 10 * mean(p, 0, 0, 0)."""
    assert char_tokens("红色 的\t圆形") == "红 色 的 圆 形"
    expected = (5.0 + 2.5 * math.exp(-1 / 72)) / 2
    assert caption_cider(["红色", "蓝"], [["红色"], ["蓝色"]]) == pytest.approx(expected, rel=1e-12)


def test_attribute_accuracy_of_hand_written_captions():
    truths = ["左边一个红色的正方形，右边一个蓝色的圆形", "图中有两个绿色的三角形", "上面有一个紫色的圆形"]
    generated = ["左边一个红色的圆形，右边一个蓝色的圆形",     # left: colour only; right: all three
                 "三个绿色的三角形",                           # colour and shape, not the count
                 "紫色紫色的"]                                 # unreadable: nothing holds
    assert caption_checks(generated[0], truths[0]) == {"colour": [True, True], "shape": [False, True],
                                                       "position": [False, True], "count": []}
    scores = attribute_accuracy(generated, truths)
    assert scores["colour"] == pytest.approx(2 / 3)       # per caption 1, 1, 0
    assert scores["shape"] == pytest.approx(0.5)          # 1/2, 1, 0
    assert scores["position"] == pytest.approx(0.25)      # 1/2, 0
    assert scores["count"] == 0.0 and scores["all"] == 0.0
    assert scores["parsed"] == pytest.approx(2 / 3) and scores["captions"] == 3
    # A readable part counts; a count is met by positional objects too.
    partial = caption_checks("左边一个红色的正方形，右边乱码", truths[0])
    assert partial == {"colour": [True, False], "shape": [True, False], "position": [True, False], "count": []}
    assert caption_checks("左边一个绿色的三角形，右边一个绿色的三角形", truths[1])["count"] == [True]
    assert attribute_accuracy(truths, truths)["all"] == 1.0


def test_vqa_accuracy_split_by_template():
    scores = vqa_accuracy(["红色", " 两个", "圆形", "蓝色"], ["红色", "两个", "正方形", "三个"],
                          ["colour_of_position_1", "count_2", "shape_of_position_1", "count_2"], ["count_2"])
    assert scores["all"] == 0.5 and scores["seen"] == 0.5 and scores["held_out"] == 0.5
    assert scores["by_template"] == {"colour_of_position_1": 1.0, "count_2": 0.5, "shape_of_position_1": 0.0}
    assert scores["questions"] == {"all": 4, "seen": 2, "held_out": 2}


def test_evaluation_on_held_out_scenes(m6, steps):
    tokenizer, config = m6["tokenizer"], m6["config"]
    from taichu.m6_eval import held_out_data

    data = held_out_data(config)
    captions = evaluate_captions(steps["torch"], tokenizer, config, GREEDY, limit=3, data=data)
    assert captions["images"] == 3 and 0 <= captions["bleu4"] <= 100 and captions["cider"] >= 0
    assert set(captions["attributes"]) >= {"colour", "shape", "position", "count", "all", "parsed"}
    vqa = evaluate_vqa(steps["torch"], tokenizer, config, GREEDY, limit=3, data=data)
    assert vqa["questions"] == {"all": 6, "seen": 3, "held_out": 3}
    assert {e["template"] for e in vqa["examples"][3:]} <= set(config.data.held_out_templates)


def test_eval_command_prints_what_its_json_holds(m6, capsys, tmp_path):
    """``taichu eval`` on the tiny model: the JSON's fields, and its numbers recomputed from the
    printed examples (--examples covers every caption and question of --limit 3)."""
    from taichu.m6_eval import held_out_data

    out = tmp_path / "eval.json"
    code, text, err = cli(capsys, "eval", m6["dir"], "--limit", 3, "--examples", 20, "--out", out)
    assert code == 0, err
    results = json.loads(out.read_text())
    assert results["backend"] == "torch" and results["held_out_templates"] == ["colour_of_position_2", "count_2"]
    captions, vqa, drawing = results["captions"], results["vqa"], results["text_to_image"]
    assert captions["images"] == 3 and set(captions["blind"]) == {"caption", "bleu4", "cider", "attributes"}
    assert vqa["questions"] == {"all": 6, "seen": 3, "held_out": 3}
    assert set(vqa["by_kind"]) == set(vqa["blind"]["by_kind"]) and vqa["blind"]["all"] is not None
    # Text to image (codebook + data.image_tokenizer): one image per distinct held-out caption.
    data = held_out_data(m6["config"])
    assert [e["caption"] for e in drawing["examples"]] == sorted({e.target for e in data.held_out_pools["caption"]})[:3]
    whole = [all(all(v) for v in e["checks"].values()) for e in drawing["examples"]]
    assert drawing["images"] == 3 and drawing["all"] == pytest.approx(np.mean(whole))
    assert drawing["sampling"] == {"temperature": 1.0, "top_k": 32, "seed": 0} and "other_image" in drawing

    lines = text.splitlines()
    assert lines[-1] == f"wrote {out}"
    start = lines.index("held-out captions (model | truth; ✓ every claim of the truth stated):")
    middle = lines.index("held-out scenes' questions (model | truth; ✓ exact match):")
    said, truths, marks = [], [], []
    for line in lines[start + 1:middle]:
        generated, truth = line[4:].rsplit(" | truth: ", 1)
        said.append(generated)
        truths.append(truth)
        marks.append(line[2])
    assert said == [one_line(e["generated"]) for e in captions["examples"]] and truths == [e["truth"] for e in
                                                                                           captions["examples"]]
    assert caption_bleu(said, truths) == pytest.approx(captions["bleu4"])
    assert caption_cider(said, truths) == pytest.approx(captions["cider"])
    recomputed = attribute_accuracy(said, truths)
    for kind, value in captions["attributes"].items():
        assert (recomputed[kind] if value is not None else None) == pytest.approx(value), kind
    assert marks.count("✓") / len(marks) == pytest.approx(captions["attributes"]["all"])
    blind = attribute_accuracy([captions["blind"]["caption"]] * 3, truths)
    assert blind["colour"] == pytest.approx(captions["blind"]["attributes"]["colour"])

    rows = []
    for line in lines[middle + 1:-1]:
        tag, _, rest = line[4:].partition("] ")
        question, _, rest = rest.partition(" -> ")
        predicted, answer = rest.rsplit(" | truth: ", 1)
        rows.append((tag[1:], question, predicted, answer, line[2]))
    assert len(rows) == 6
    assert sorted(r[:4] for r in rows) == sorted((e["template"] + (", held out" if e["template"] in
                                                  results["held_out_templates"] else ""), e["question"],
                                                 one_line(e["predicted"]), e["answer"]) for e in vqa["examples"])
    held = [r for r in rows if r[0].endswith(", held out")]
    seen = [r for r in rows if not r[0].endswith(", held out")]
    assert [r[0] for r in rows[:2]] == [seen[0][0], held[0][0]]     # seen and held-out templates in turn
    for group, name in ((rows, "all"), (seen, "seen"), (held, "held_out")):
        assert np.mean([p == a for _, _, p, a, _ in group]) == pytest.approx(vqa[name]), name
        assert np.mean([m == "✓" for *_, m in group]) == pytest.approx(vqa[name]), name
    assert any(line.startswith("captions of 3 held-out images: BLEU-4 ") for line in lines)
    assert any(line.startswith("answers, exact match: seen templates ") for line in lines)
    assert any(line.startswith("text to image, one image per distinct held-out caption (3, ") for line in lines)

    code, _, err = cli(capsys, "eval", m6["dir"], "--data", "digits")
    assert code == 2 and "evaluated on its own held-out scenes" in err
