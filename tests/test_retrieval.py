"""Using image-text models: retrieval metrics on hand-checked matrices, the vector index
(faiss and the numpy fallback agree, save/load, corruption refused), embeddings in both
backends, and the embed / index / search / eval commands on a random clip-tiny."""
import itertools
import json
import shutil
from math import comb

import numpy as np
import pytest
from PIL import Image

from taichu.cli import main as taichu_main
from taichu.config import load_config
from taichu.imagetext import digit_prompts, digits_pairs, load_image_text, scene_texts
from taichu.retrieval import (CorruptIndexError, Embedder, VectorIndex, chance_recall_at_k,
                              recall_at_k, zero_shot_accuracy)
from conftest import CONFIGS
from tolerance import clip_embedding_tolerances, float32_tolerance, unit_norm_tolerance

TINY = CONFIGS / "clip" / "clip-tiny.yaml"
# Two float32 evaluations of clip-tiny's unit embeddings (another batch shape, another code
# path) may differ by the rounding of each tower's chain of sums (tests/tolerance.py).
IMAGE_TOL, TEXT_TOL = clip_embedding_tolerances(load_config(TINY).model)


# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def clip_tokenizer(tmp_path_factory):
    """A 4096-piece tokenizer (clip-tiny's vocabulary) on People's Daily plus captions."""
    from taichu.corpus import peoples_daily_paragraphs
    from taichu.imagetext import digit_texts
    from taichu.tokenizer import train_tokenizer

    config = load_config(TINY)
    texts = peoples_daily_paragraphs()[:3000] + digit_texts() + scene_texts(500)
    path = tmp_path_factory.mktemp("clip_tokenizer") / "tokenizer.model"
    train_tokenizer(texts, config.tokenizer, config.model.text.vocab_size, path)
    return path


def init_model(out, tokenizer, seed=0):
    code = taichu_main(["init", str(TINY), "--backend", "torch", "--seed", str(seed),
                        "--tokenizer", str(tokenizer), "--out", str(out)])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, clip_tokenizer):
    """A randomly initialised clip-tiny directory written by `taichu init`."""
    return init_model(tmp_path_factory.mktemp("clip_tiny") / "model", clip_tokenizer)


@pytest.fixture(scope="module")
def embedder(model_dir):
    return Embedder(model_dir, "torch", batch_size=4)   # small batches: several per call


@pytest.fixture(scope="module")
def digit_images():
    return [pair.image for pair in digits_pairs()[:6]]


def run_cli(capsys, *argv):
    code = taichu_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------ metrics


def test_recall_at_k_pairs_on_the_diagonal():
    # Query 0: its item scores 0.9, the best -> rank 1. Query 1: 0.2, beaten by 0.8 -> rank 2.
    # Query 2: 0.7 against 0.1 and 0.5 -> rank 1.
    similarity = np.array([[0.9, 0.1, 0.3],
                           [0.8, 0.2, 0.1],
                           [0.1, 0.5, 0.7]])
    assert recall_at_k(similarity, 1) == pytest.approx(2 / 3)
    assert recall_at_k(similarity, 2) == 1.0
    assert recall_at_k(similarity, 10) == 1.0           # K above the item count
    # Image -> text reads the transpose: item 1 (0.2) is beaten by 0.5 there too.
    assert recall_at_k(similarity.T, 1) == pytest.approx(2 / 3)


def test_recall_ties_count_against_the_model():
    assert recall_at_k(np.ones((3, 3)), 1) == 0.0       # collapsed embeddings: no lucky hits
    assert recall_at_k(np.ones((3, 3)), 2) == 0.0
    assert recall_at_k(np.ones((3, 3)), 3) == 1.0
    # Query 0 ties with one wrong item: rank 2.
    similarity = np.array([[0.5, 0.5, 0.1],
                           [0.0, 0.9, 0.2],
                           [0.0, 0.1, 0.3]])
    assert recall_at_k(similarity, 1) == pytest.approx(2 / 3)
    assert recall_at_k(similarity, 2) == 1.0


def test_recall_with_repeated_captions_counts_any_item_of_the_same_caption():
    # Captions 0 and 1 are the same string (group 0), caption 2 another (group 1); images
    # likewise. Text query 0's own image (item 0) ranks last, but image 1 has the same
    # caption and ranks first: a hit with groups, a miss on the diagonal alone.
    groups = np.array([0, 0, 1])
    similarity = np.array([[0.1, 0.9, 0.5],
                           [0.2, 0.3, 0.8],
                           [0.6, 0.1, 0.4]])
    assert recall_at_k(similarity, 1) == 0.0
    # Query 1: best relevant 0.3 < 0.8 (group 1) -> rank 2; query 2: 0.4 < 0.6 -> rank 2.
    assert recall_at_k(similarity, 1, groups, groups) == pytest.approx(1 / 3)
    assert recall_at_k(similarity, 2, groups, groups) == 1.0
    # Deduplicated captions as queries (what taichu eval does): 2 queries, 3 images.
    dedup = np.array([[0.1, 0.9, 0.5],
                      [0.6, 0.1, 0.4]])
    assert recall_at_k(dedup, 1, [0, 1], groups) == 0.5
    assert recall_at_k(dedup, 3, [0, 1], groups) == 1.0


def test_recall_refuses_undefined_cases():
    with pytest.raises(ValueError, match="square"):
        recall_at_k(np.zeros((2, 3)), 1)
    with pytest.raises(ValueError, match=r"queries \[1\] have no relevant item"):
        recall_at_k(np.zeros((2, 2)), 1, [0, 5], [0, 1])
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k(np.zeros((2, 2)), 0)
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(np.full((2, 2), np.nan), 1)


def brute_force_chance(k, query_groups, item_groups):
    """Average over every ordering of the items: the definition, not the formula."""
    orders = list(itertools.permutations(range(len(item_groups))))
    hits = [sum(any(item_groups[j] == g for j in order[:k]) for order in orders) / len(orders)
            for g in query_groups]
    return sum(hits) / len(hits)


def test_chance_recall_equals_an_average_over_all_orderings():
    item_groups, query_groups = [0, 0, 1, 2, 2], [0, 1, 2]
    for k in (1, 2, 3):
        assert chance_recall_at_k(k, query_groups=query_groups, item_groups=item_groups) == \
            pytest.approx(brute_force_chance(k, query_groups, item_groups))
    # By hand: group 0 has 2 of 5 items, K = 1 -> 2/5; group 1: 1/5; group 2: 2/5.
    assert chance_recall_at_k(1, query_groups=query_groups, item_groups=item_groups) == \
        pytest.approx((2 / 5 + 1 / 5 + 2 / 5) / 3)
    assert chance_recall_at_k(5, n_items=60) == pytest.approx(5 / 60)


def test_zero_shot_accuracy_by_hand():
    similarity = np.array([[0.9, 0.1, 0.0],    # label 0: right
                           [0.2, 0.1, 0.3],    # label 1: wrong (class 2 wins)
                           [0.5, 0.5, 0.5],    # label 2: a tie for the top counts as wrong
                           [0.0, 0.0, 0.1]])   # label 2: right
    assert zero_shot_accuracy(similarity, [0, 1, 2, 2]) == 0.5
    with pytest.raises(ValueError, match="labels must be in 0..2"):
        zero_shot_accuracy(similarity, [0, 1, 3, 2])


# ------------------------------------------------------------------------ index


def unit_rows(rng, n, dim):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_numpy_search_breaks_ties_by_id():
    e = np.eye(3, dtype=np.float32)
    index = VectorIndex(3, backend="numpy")
    index.add(np.stack([e[0], e[1], e[0], e[2], e[0]]))
    scores, ids = index.search(e[0], 2)
    assert ids.tolist() == [[0, 2]] and scores.tolist() == [[1.0, 1.0]]
    # Score 0 ties between ids 1 and 3: the lower id comes first.
    assert index.search(e[0], 4)[1].tolist() == [[0, 2, 4, 1]]
    assert index.search(e[0], 99)[1].tolist() == [[0, 2, 4, 1, 3]]    # k clamped to the size


@pytest.mark.parametrize("n_queries", [5, 64])   # faiss uses BLAS from 20 queries on
def test_faiss_and_numpy_return_the_same_ids(n_queries):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    vectors = unit_rows(rng, 800, 32)
    vectors[400:430] = vectors[7]               # 31 exact duplicates: a tie group across the cut
    vectors[600] = vectors[8]
    queries = np.concatenate([unit_rows(rng, n_queries - 2, 32), vectors[[7, 8]]])
    results = {}
    for backend in ("faiss", "numpy"):
        index = VectorIndex(32, backend=backend)
        assert index.backend == backend
        index.add(vectors[:500])
        index.add(vectors[500:])                 # two adds: ids continue
        results[backend] = index.search(queries, 10)
    (faiss_scores, faiss_ids), (numpy_scores, numpy_ids) = results["faiss"], results["numpy"]
    np.testing.assert_array_equal(faiss_ids, numpy_ids)
    # Inner products of 32-d unit rows, summed by two libraries' kernels.
    np.testing.assert_allclose(faiss_scores, numpy_scores, atol=float32_tolerance(1.0, 32), rtol=0)
    # The duplicated query keeps the lowest ids of its tie group, in order.
    assert numpy_ids[-2].tolist() == [7] + list(range(400, 409))
    assert numpy_ids[-1][:2].tolist() == [8, 600]
    # And the scores are the true inner products, best first.
    exact = queries @ vectors.T
    np.testing.assert_allclose(numpy_scores, np.take_along_axis(exact, numpy_ids, 1),
                               atol=float32_tolerance(1.0, 32), rtol=0)
    assert np.all(np.diff(numpy_scores, axis=1) <= 0)


@pytest.mark.parametrize("built_with", ["faiss", "numpy"])
def test_index_round_trip_in_either_backend(tmp_path, built_with):
    if built_with == "faiss":
        pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    vectors = unit_rows(rng, 50, 16)
    items = [{"text": f"第{i}条说明"} for i in range(50)]
    index = VectorIndex(16, backend=built_with, metadata={"modality": "text"})
    index.add(vectors, items)
    index.save(tmp_path / "idx")
    queries = unit_rows(rng, 3, 16)
    for backend in ("numpy", "auto"):
        loaded = VectorIndex.load(tmp_path / "idx", backend=backend)
        assert loaded.items == items and loaded.metadata == {"modality": "text"}
        np.testing.assert_array_equal(loaded.vectors, vectors)
        np.testing.assert_array_equal(loaded.search(queries, 5)[1], index.search(queries, 5)[1])
    # Saving again replaces the index as a whole, leaving no temporary directories behind.
    smaller = VectorIndex(16, backend="numpy")
    smaller.add(vectors[:3], items[:3])
    smaller.save(tmp_path / "idx")
    assert len(VectorIndex.load(tmp_path / "idx")) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_save_never_replaces_a_directory_that_is_not_an_index(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"keep me")
    index = VectorIndex(4, backend="numpy")
    index.add(np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match="not a taichu index"):
        index.save(tmp_path / "photos")
    assert (tmp_path / "photos" / "a.jpg").read_bytes() == b"keep me"


def test_corrupt_or_incomplete_index_is_refused(tmp_path):
    index = VectorIndex(8, backend="numpy")
    index.add(unit_rows(np.random.default_rng(2), 20, 8), [{"image": f"{i}.png"} for i in range(20)])
    path = index.save(tmp_path / "idx")
    data = (path / "vectors.npy").read_bytes()
    (path / "vectors.npy").write_bytes(data[:-40])                        # truncated
    with pytest.raises(CorruptIndexError, match="vectors.npy.*truncated or modified"):
        VectorIndex.load(path)
    (path / "vectors.npy").write_bytes(data)
    VectorIndex.load(path)                                                # restored: fine
    items = (path / "items.jsonl").read_text()
    (path / "items.jsonl").write_text(items.replace("3.png", "4.png"))    # edited
    with pytest.raises(CorruptIndexError, match="items.jsonl"):
        VectorIndex.load(path)
    (path / "items.jsonl").write_text(items)
    (path / "index.json").write_text("{\"format\": ")                     # torn manifest
    with pytest.raises(CorruptIndexError, match="unreadable manifest"):
        VectorIndex.load(path)
    (path / "index.json").unlink()
    with pytest.raises(CorruptIndexError, match="no index.json"):
        VectorIndex.load(path)


# ------------------------------------------------------------------------ embeddings


def test_embeddings_are_unit_rows_independent_of_batching(embedder, model_dir, digit_images):
    images = embedder.embed_images(digit_images)
    texts = embedder.embed_texts(digit_prompts())
    assert images.shape == (6, 32) and texts.shape == (10, 32)
    assert images.dtype == texts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=unit_norm_tolerance(32), rtol=0)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=unit_norm_tolerance(32), rtol=0)
    # Batches of 4 vs one batch of everything: the same rows.
    whole = Embedder(model_dir, "torch", batch_size=64)
    np.testing.assert_allclose(whole.embed_images(digit_images), images, atol=IMAGE_TOL, rtol=0)
    np.testing.assert_allclose(whole.embed_texts(digit_prompts()), texts, atol=TEXT_TOL, rtol=0)
    # Different images and captions do give different vectors (a random model still does).
    assert np.abs(texts[0] - texts[1]).max() > 1e-3


def test_torch_and_mindspore_embeddings_agree(embedder, model_dir, digit_images):
    ms_embedder = Embedder(model_dir, "mindspore", batch_size=4)
    captions = digit_prompts() + ["左边一个红色的圆形，右边一个蓝色的正方形"]
    np.testing.assert_allclose(ms_embedder.embed_images(digit_images),
                               embedder.embed_images(digit_images), atol=1e-5)
    np.testing.assert_allclose(ms_embedder.embed_texts(captions), embedder.embed_texts(captions),
                               atol=1e-5)


def test_long_caption_is_cut_at_the_context(embedder):
    import torch

    long = "，".join(scene_texts(40))                  # hundreds of tokens, context is 32
    tokens = embedder.tokenizer.encode(long)
    context = embedder.context_length
    assert len(tokens) > 3 * context
    # What the rule says the model must see: [bos] + the first context - 2 tokens + [eos].
    ids = np.array([[embedder.tokenizer.bos_id] + tokens[:context - 2] + [embedder.tokenizer.eos_id]])
    with torch.no_grad():
        expected = embedder.model.get_text_features(torch.from_numpy(ids),
                                                    torch.ones_like(torch.from_numpy(ids))).numpy()
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(embedder.embed_texts([long]), expected, atol=TEXT_TOL, rtol=0)
    # So text after the cut changes nothing.
    np.testing.assert_allclose(embedder.embed_texts([long + "三个黑色的三角形"]), expected, atol=TEXT_TOL, rtol=0)


def test_embedder_refuses_models_and_backends_it_cannot_use(tmp_path, model_dir, clip_tokenizer):
    with pytest.raises(ValueError, match="not an ONNX export.*taichu export"):
        Embedder(model_dir, "onnx")
    # An export directory without the encoder that runs it: taichu/ cannot build one itself.
    (tmp_path / "fake_export").mkdir()
    shutil.copy(model_dir / "config.yaml", tmp_path / "fake_export" / "config.yaml")
    (tmp_path / "fake_export" / "export_info.json").write_text("{}")
    with pytest.raises(ValueError, match=r"export\.export_embedder"):
        Embedder(tmp_path / "fake_export", "onnx")
    with pytest.raises(ValueError, match="unknown backend"):
        Embedder(model_dir, "tensorflow")
    assert taichu_main(["init", str(CONFIGS / "gpt" / "gpt-tiny.yaml"), "--backend", "torch",
                        "--tokenizer", str(clip_tokenizer), "--out", str(tmp_path / "gpt")]) == 0
    with pytest.raises(ValueError, match="is a gpt model: embeddings need an image-text model"):
        Embedder(tmp_path / "gpt", "torch")


# ------------------------------------------------------------------------ commands


def test_embed_images_writes_rows_in_listed_order(tmp_path, capsys, embedder, digit_images):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    names = ["b.png", "a.png", "sub/c.png", "d.jpg"]
    for name, image in zip(names, digit_images):
        image.save(folder / name)
    (folder / "notes.txt").write_text("not an image, skipped in a folder")
    extra = tmp_path / "extra.png"
    digit_images[4].save(extra)
    code, out, err = run_cli(capsys, "embed", embedder.model_dir, "--images", folder, extra,
                             "--out", tmp_path / "emb.npy", "--batch-size", 3)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "emb.jsonl").read_text().splitlines()]
    expected_paths = [folder / "a.png", folder / "b.png", folder / "d.jpg", folder / "sub" / "c.png", extra]
    assert rows == [{"row": i, "image": str(p)} for i, p in enumerate(expected_paths)]
    vectors = np.load(tmp_path / "emb.npy")
    for row, path in enumerate(expected_paths):   # each row is its own file's embedding
        np.testing.assert_allclose(vectors[row], embedder.embed_images([path])[0], atol=IMAGE_TOL, rtol=0)


def test_embed_texts_writes_rows_in_line_order(tmp_path, capsys, embedder):
    captions = ["左边一个红色的圆形", "手写的数字七", "一张数字3的图片"]
    (tmp_path / "captions.txt").write_text("\r\n".join(captions) + "\r\n", encoding="utf-8")
    code, out, err = run_cli(capsys, "embed", embedder.model_dir, "--texts", tmp_path / "captions.txt",
                             "--out", tmp_path / "emb.npy")
    assert code == 0, err
    assert [json.loads(line)["text"] for line in (tmp_path / "emb.jsonl").read_text().splitlines()] \
        == captions
    np.testing.assert_allclose(np.load(tmp_path / "emb.npy"), embedder.embed_texts(captions), atol=TEXT_TOL, rtol=0)


def test_embed_refuses_a_non_image_naming_it_and_writes_nothing(tmp_path, capsys, embedder, digit_images):
    good, bad = tmp_path / "good.png", tmp_path / "report.png"
    digit_images[0].save(good)
    bad.write_text("this is text with an image's name")
    code, out, err = run_cli(capsys, "embed", embedder.model_dir, "--images", good, bad,
                             "--out", tmp_path / "emb.npy")
    assert code == 2
    assert str(bad) in err and "not a readable image" in err
    assert not (tmp_path / "emb.npy").exists() and not (tmp_path / "emb.jsonl").exists()


def test_embed_accepts_grey_and_rgba_images_as_their_rgb_versions(tmp_path, capsys, embedder):
    grey = np.random.default_rng(3).integers(0, 256, (40, 40), dtype=np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    # RGBA: an opaque red square on fully transparent black. Keeping the hidden black
    # instead of compositing onto white would change the picture completely.
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[10:30, 10:30] = (220, 30, 30, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    on_white = np.full((40, 40, 3), 255, np.uint8)
    on_white[10:30, 10:30] = (220, 30, 30)
    code, out, err = run_cli(capsys, "embed", embedder.model_dir, "--images", tmp_path / "grey.png",
                             tmp_path / "rgba.png", "--out", tmp_path / "emb.npy")
    assert code == 0, err
    vectors = np.load(tmp_path / "emb.npy")
    expected = embedder.embed_images([np.repeat(grey[:, :, None], 3, axis=2), on_white])
    np.testing.assert_allclose(vectors, expected, atol=IMAGE_TOL, rtol=0)
    on_black = rgba[:, :, :3].copy()
    assert np.abs(embedder.embed_images([on_black])[0] - vectors[1]).max() > 1e-3


def test_embed_refuses_an_empty_caption_line_naming_it(tmp_path, capsys, embedder):
    (tmp_path / "captions.txt").write_text("手写的数字七\n一张数字3的图片\n  \n左边一个红色的圆形\n",
                                           encoding="utf-8")
    code, out, err = run_cli(capsys, "embed", embedder.model_dir, "--texts", tmp_path / "captions.txt",
                             "--out", tmp_path / "emb.npy")
    assert code == 2
    assert f"{tmp_path / 'captions.txt'}:3: empty caption line" in err
    assert not (tmp_path / "emb.npy").exists()


def test_onnx_export_gives_the_same_embeddings(tmp_path, capsys, embedder, digit_images):
    pytest.importorskip("onnxruntime")
    runtime = pytest.importorskip("export.runtime_encoders")
    code, out, err = run_cli(capsys, "export", embedder.model_dir, "--format", "onnx",
                             "--out", tmp_path / "export", "--no-validate")
    assert code == 0, err
    onnx = runtime.export_embedder(tmp_path / "export", "onnx", batch_size=4)
    captions = digit_prompts()
    # The design's bound for ONNX Runtime against its source framework.
    np.testing.assert_allclose(onnx.embed_images(digit_images), embedder.embed_images(digit_images),
                               atol=1e-4)
    np.testing.assert_allclose(onnx.embed_texts(captions), embedder.embed_texts(captions), atol=1e-4)
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    code, out, err = run_cli(capsys, "embed", tmp_path / "export", "--backend", "onnx",
                             "--texts", tmp_path / "captions.txt", "--out", tmp_path / "emb.npy")
    assert code == 0, err
    np.testing.assert_allclose(np.load(tmp_path / "emb.npy"), embedder.embed_texts(captions), atol=1e-4)
    # The export directory is not a model directory for the frameworks.
    code, out, err = run_cli(capsys, "embed", tmp_path / "export", "--texts", tmp_path / "captions.txt",
                             "--out", tmp_path / "emb2.npy")
    assert code == 2 and "use --backend onnx" in err


def test_index_and_search_both_ways(tmp_path, capsys, embedder, digit_images, clip_tokenizer):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(digit_images):
        image.save(folder / f"{i}.png")
    captions = digit_prompts()
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    model = embedder.model_dir
    assert run_cli(capsys, "index", model, "--images", folder, "--out", tmp_path / "images.idx")[0] == 0
    assert run_cli(capsys, "index", model, "--texts", tmp_path / "captions.txt",
                   "--out", tmp_path / "texts.idx")[0] == 0

    # text -> images: the printed ranking is the exact ranking of the embeddings.
    code, out, err = run_cli(capsys, "search", model, "--index", tmp_path / "images.idx",
                             "--text", "手写的数字三", "-k", 3)
    assert code == 0, err
    lines = out.splitlines()
    scores = embedder.embed_images(sorted(folder.iterdir())) @ embedder.embed_texts(["手写的数字三"])[0]
    best = np.argsort(-scores, kind="stable")[:3]
    assert len(lines) == 4 and "3 of 6 images" in lines[0]
    for line, i in zip(lines[1:], best):
        rank, score, path = line.split()
        assert path == str((folder / f"{i}.png").resolve()) and float(score) == pytest.approx(scores[i], abs=1e-4)

    # image -> texts
    code, out, err = run_cli(capsys, "search", model, "--index", tmp_path / "texts.idx",
                             "--image", folder / "2.png", "-k", 10)
    assert code == 0, err
    scores = embedder.embed_texts(captions) @ embedder.embed_images([folder / "2.png"])[0]
    assert [line.split()[2] for line in out.splitlines()[1:]] == \
        [captions[i] for i in np.argsort(-scores, kind="stable")]

    # Another model's vectors live in another space: refused, not silently searched.
    other = init_model(tmp_path / "other", clip_tokenizer, seed=1)
    code, out, err = run_cli(capsys, "search", other, "--index", tmp_path / "images.idx", "--text", "七")
    assert code == 2 and "built with another model" in err
    # A damaged index is refused by the command too.
    (tmp_path / "images.idx" / "vectors.npy").write_bytes(b"\x93NUMPY")
    code, out, err = run_cli(capsys, "search", model, "--index", tmp_path / "images.idx", "--text", "七")
    assert code == 2 and "truncated or modified" in err


def test_eval_on_a_random_model_reports_chance_levels(tmp_path, capsys, model_dir):
    code, out, err = run_cli(capsys, "eval", model_dir, "--out", tmp_path / "metrics.json")
    assert code == 0, err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # The held-out split of the model's own data config (digits, 20 %, seed 0).
    data = load_config(model_dir).data
    test = load_image_text("digits", data.validation_fraction, data.split_seed).test
    captions = sorted({p.text for p in test})
    assert metrics["images"] == len(test) and metrics["unique_captions"] == len(captions)
    assert metrics["split"] == "test" and metrics["data"] == "digits"
    i2t, t2i = metrics["image_to_text"], metrics["text_to_image"]
    # image -> text: one right caption among the distinct ones.
    assert i2t["chance"]["R@1"] == pytest.approx(1 / len(captions))
    assert i2t["chance"]["R@5"] == pytest.approx(5 / len(captions))
    # text -> image: a caption with m of the N images is hit by chance with 1 - C(N-m,5)/C(N,5).
    n = len(test)
    counts = [sum(p.text == c for p in test) for c in captions]
    assert t2i["chance"]["R@5"] == pytest.approx(
        sum(1 - comb(n - m, 5) / comb(n, 5) for m in counts) / len(counts))
    for direction in (i2t, t2i):
        assert 0.0 <= direction["R@1"] <= direction["R@5"] <= 1.0
    assert metrics["zero_shot"]["chance"] == 0.1 and 0.0 <= metrics["zero_shot"]["accuracy"] <= 1.0
    assert "chance" in out and "zero-shot digit accuracy" in out and "R@5" in out
