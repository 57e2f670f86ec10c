"""``taichu distill`` (issue 18): the layer map and the checks on a student/teacher pair,
each loss term in both backends against the numpy reference of TinyBERT's equations, the
same 20 distillation steps in both backends, exact resume, a student directory that loads
alone, and clear errors for pairs that cannot be distilled."""
import json
import shutil

import numpy as np
import pytest

import taichu
from taichu.config import ConfigError, load_config
from taichu.distill import (PROJECTIONS_FILE, initial_projections, plan_distillation, run_distillation,
                            step_weights, uniform_layer_map)
from taichu.train import TASK_DATA, read_metrics
from conftest import CONFIGS, logged_losses as losses
from distill_reference import reference_terms

CLIP = CONFIGS / "clip" / "clip-tiny.yaml"
# A deeper, wider teacher for clip-tiny (2 layers, widths 48 / 32, 4 heads each): 4 layers,
# twice the width and the heads, so projections, the uniform map (2 -> 2, 4) and the
# averaging of teacher heads in pairs all take part.
CLIP_TEACHER = ["model.image.num_layers=4", "model.image.hidden_size=96", "model.image.num_heads=8",
                "model.text.num_layers=4", "model.text.hidden_size=64", "model.text.num_heads=8",
                "model.projection_dim=48"]


def test_uniform_layer_map_is_tinybert_s():
    assert uniform_layer_map(3, 12) == (4, 8, 12)
    assert uniform_layer_map(6, 24) == (4, 8, 12, 16, 20, 24)
    assert uniform_layer_map(8, 20) == (2, 5, 7, 10, 12, 15, 17, 20)   # floor(m N / M)
    assert uniform_layer_map(4, 4) == (1, 2, 3, 4)


@pytest.mark.parametrize("student, teacher", [("clip/clip-light", "clip/clip-teacher"),
                                              ("dalle/dalle-light", "dalle/dalle-teacher"),
                                              ("clip/clip-small-student", "clip/clip-small-teacher")])
def test_released_and_cpu_pairs_can_be_distilled(student, teacher):
    teacher = load_config(CONFIGS / f"{teacher}.yaml")
    plans = plan_distillation(load_config(CONFIGS / f"{student}.yaml"), teacher)
    depths = [stream.num_layers for stream in taichu.families.get_family(teacher.family).distill_streams(teacher)]
    assert [plan.layer_map[-1] for plan in plans] == depths    # the last layer learns from the last


def test_plan_of_the_clip_pair():
    plans = plan_distillation(load_config(CLIP), load_config(CLIP, CLIP_TEACHER))
    assert [(p.name, p.student_width, p.teacher_width, p.layer_map, p.head_group, p.causal)
            for p in plans] == [("text", 32, 64, (2, 4), 2, True), ("image", 48, 96, (2, 4), 2, False)]
    explicit = plan_distillation(load_config(CLIP, ["distill.layer_map.image=[1, 3]"]),
                                 load_config(CLIP, CLIP_TEACHER))
    assert explicit[1].layer_map == (1, 3) and explicit[0].layer_map == (2, 4)


@pytest.mark.parametrize("student, teacher, key", [
    ([], "gpt", "family"),
    (["distill.layer_map.text=[2, 5]"], CLIP_TEACHER, "distill.layer_map.text: teacher layer 5 is out of range"),
    (["distill.layer_map.image=[1]"], CLIP_TEACHER, "distill.layer_map.image: 1 entries"),
    (["distill.layer_map.audio=[1, 2]"], CLIP_TEACHER, "distill.layer_map: unknown stream 'audio'"),
    ([], CLIP_TEACHER[:2] + ["model.image.num_heads=6"] + CLIP_TEACHER[3:], "distill.attention_heads"),
    (["distill.attention_heads=refuse"], CLIP_TEACHER, "distill.attention_heads: refuse"),
    ([], CLIP_TEACHER + ["model.text.max_position_embeddings=48"], "model.text.max_position_embeddings"),
    ([], CLIP_TEACHER + ["model.image.patch_size=4"], "model.image.patch_size"),
    (["model.text.num_layers=6"], CLIP_TEACHER, "distill.layer_map.text"),
], ids=["other-family", "layer-out-of-range", "map-length", "unknown-stream", "heads-not-multiple",
        "heads-refused", "text-length", "patch-grid", "student-deeper"])
def test_pairs_that_cannot_be_distilled_name_the_key(student, teacher, key):
    teacher_config = (load_config(CONFIGS / "gpt" / "gpt-tiny.yaml") if teacher == "gpt"
                      else load_config(CLIP, teacher))
    with pytest.raises(ConfigError) as err:
        plan_distillation(load_config(CLIP, student), teacher_config, "teacher/config.yaml")
    assert key in str(err.value), str(err.value)


def test_two_stages_switch_the_terms():
    settings = load_config(CLIP, ["distill.intermediate_steps=5", "distill.kd_weight=2",
                                  "distill.student_weight=0.5", "distill.hidden_weight=3"]).distill
    assert step_weights(settings, 4).tolist() == [1, 3, 1, 0, 2, 0]
    assert step_weights(settings, 5).tolist() == [0, 0, 0, 1, 2, 0.5]
    assert step_weights(settings, None).tolist() == [0, 0, 0, 0, 0, 1]   # validation: student loss
    one_stage = load_config(CLIP, ["distill.kd_weight=2"]).distill
    assert step_weights(one_stage, 0).tolist() == step_weights(one_stage, 10 ** 6).tolist() == [1, 1, 1, 1, 2, 1]


def _fixed_intermediates(rng, plans, batch=2, lengths=(5, 4)):
    """Random student/teacher streams and predictions of the shapes distill_outputs gives,
    with a padded text row so the token and pair masks matter."""
    student_streams, teacher_streams = [], []
    for plan, length in zip(plans, lengths):
        mask = np.ones((batch, length), np.float32)
        if plan.causal:
            mask[1, 3:] = 0
        student_heads, teacher_heads = 4, 4 * plan.head_group
        s_layers, t_layers = len(plan.layer_map), max(plan.layer_map)
        draw = lambda *shape: rng.normal(0, 1.5, shape).astype(np.float32)
        student_streams.append(([draw(batch, length, plan.student_width) for _ in range(s_layers + 1)],
                                [draw(batch, student_heads, length, length) for _ in range(s_layers)],
                                mask, plan.causal))
        teacher_streams.append(([draw(batch, length, plan.teacher_width) for _ in range(t_layers + 1)],
                                [draw(batch, teacher_heads, length, length) for _ in range(t_layers)],
                                mask, plan.causal))
    weights = np.array([0.2, 0.3, 0.5], np.float32)
    student_predictions = [(rng.normal(0, 2, (3, 7)).astype(np.float32), weights)]
    teacher_predictions = [(rng.normal(0, 2, (3, 7)).astype(np.float32), weights)]
    return student_predictions, student_streams, teacher_predictions, teacher_streams


def _as_tensors(tree, tensor):
    if isinstance(tree, np.ndarray):
        return tensor(tree)
    if isinstance(tree, (list, tuple)):
        return tuple(_as_tensors(x, tensor) for x in tree)
    return tree


def test_each_loss_term_equals_the_numpy_reference_in_both_backends():
    import mindspore as ms
    import torch

    student, teacher = load_config(CLIP, ["distill.temperature=2.0"]), load_config(CLIP, CLIP_TEACHER)
    plans = plan_distillation(student, teacher)
    projections = initial_projections(plans, seed=3)
    inputs = _fixed_intermediates(np.random.default_rng(0), plans)
    expected = reference_terms(plans, {i: (projections[f"projections.{i}.embedding.weight"],
                                           projections[f"projections.{i}.hidden.weight"]) for i in range(2)},
                               2.0, *inputs)
    for backend, tensor in (("torch", torch.from_numpy), ("mindspore", ms.Tensor)):
        module = __import__(f"{backend}_impl.distill", fromlist=["Distiller"])
        model = module.Distiller(taichu.build_model(student, backend), taichu.build_model(teacher, backend),
                                 plans, 2.0)
        module.load_projections(model, projections)
        terms = module.kd_terms(model, *_as_tensors(inputs, tensor))
        got = [float(t.detach().numpy() if backend == "torch" else t.asnumpy()) for t in terms]
        # Each term is a float32 sum of at most ~2,000 squared differences (or 21 soft
        # cross-entropy terms) of O(1) values: even a sequential float32 sum (MindSpore's CPU
        # ReduceSum) stays within n * 2^-24 ~ 1.2e-4 relative, typically sqrt(n) * 2^-24
        # ~ 3e-6; 1e-5 holds with margin on the typical bound and would catch any wrong
        # mask, group or projection (those move a term by 10 % or more).
        np.testing.assert_allclose(got, expected, rtol=1e-5, err_msg=backend)


@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory, imagetext_cache):
    """A random clip-tiny student init and a random wider, deeper teacher, with the run's
    tokenizer (the teacher's is the one distillation uses)."""
    import torch

    root = tmp_path_factory.mktemp("distill-pair")
    student = load_config(CLIP, [f"data.cache_dir={imagetext_cache}"])
    tokenizer = TASK_DATA["image_text"](student, None, 0).tokenizer
    torch.manual_seed(0)
    init = taichu.save_model(taichu.build_model(student, "torch"), root / "student-init", tokenizer=tokenizer.path)
    torch.manual_seed(1)
    teacher = taichu.save_model(taichu.build_model(load_config(CLIP, CLIP_TEACHER), "torch"), root / "teacher",
                                tokenizer=tokenizer.path)
    return init, teacher


def distill_run(cache, *extra):
    return [f"data.cache_dir={cache}", "train.batch_size=8", "train.warmup_steps=3",
            "train.learning_rate=2e-3", "train.min_learning_rate=1e-4", "train.log_interval=1",
            "train.eval_interval=1000", "train.eval_batches=2", "distill.temperature=2.0", *extra]


@pytest.mark.slow
def test_first_20_distillation_steps_agree_across_backends(tmp_path, imagetext_cache, clip_pair,
                                                           eager_mindspore_eval):
    """Same student init, teacher, projections and batches, both stages (10 + 10 steps):
    MindSpore (graph mode) = PyTorch, step for step, and the student really learns."""
    init, teacher = clip_pair
    overrides = distill_run(imagetext_cache, "train.max_steps=20", "distill.intermediate_steps=10")
    runs = {}
    for backend in ("torch", "mindspore"):
        config = load_config(CLIP, overrides)
        run_distillation(config, teacher, backend, tmp_path / backend, init_dir=init, progress=False)
        runs[backend] = losses(tmp_path / backend)
    assert sorted(runs["torch"]) == list(range(1, 21))
    ours, theirs = (np.array([runs[b][s] for s in range(1, 21)]) for b in ("torch", "mindspore"))
    relative = np.abs(ours - theirs) / np.abs(ours)
    assert relative.max() <= 1e-4, f"worst relative difference {relative.max():.2e} at step {relative.argmax() + 1}"
    assert ours[5:10].mean() < ours[:5].mean()          # the intermediate stage learns
    assert ours[15:].mean() < ours[10:15].mean()        # and the prediction stage


def test_distill_writes_a_plain_student_and_resumes_exactly(tmp_path, imagetext_cache, clip_pair, capsys):
    """Checkpoints hold the student's model directory plus the projections; final/ is the
    student alone (it loads like any clip-tiny model); a run cut at step 3 and resumed logs
    the same losses and ends with the same weights as an uninterrupted one; resuming with
    another teacher is refused."""
    from taichu.cli import main

    init, teacher = clip_pair
    common = distill_run(imagetext_cache, "train.max_steps=6", "train.checkpoint_interval=3")
    straight = tmp_path / "straight"
    run_distillation(load_config(CLIP, common), teacher, "torch", straight, init_dir=init, progress=False)
    cut = tmp_path / "cut"
    run_distillation(load_config(CLIP, common + ["train.max_steps=3"]), teacher, "torch", cut, init_dir=init,
                     progress=False)
    checkpoint = cut / "checkpoints" / "step-00000003"
    projections = taichu.weights.load_safetensors(checkpoint / PROJECTIONS_FILE)
    assert sorted(projections) == [f"projections.{i}.{part}.weight" for i in (0, 1) for part in ("embedding", "hidden")]
    assert json.loads((cut / "teacher.json").read_text())["teacher"] == str(teacher)
    taichu.load_model(checkpoint, backend="torch")        # a checkpoint is a student model directory
    run_distillation(load_config(CLIP, common), teacher, "torch", cut, resume=True, progress=False)
    assert losses(cut) == losses(straight)
    a = taichu.state_dict(taichu.load_model(straight / "final", backend="torch"))
    b = taichu.state_dict(taichu.load_model(cut / "final", backend="torch"))
    specs = taichu.families.get_family("clip").tensor_specs(load_config(CLIP))
    assert set(a) == set(specs)                          # the student alone: no teacher, no projections
    assert all(np.array_equal(a[k], b[k]) for k in a)
    records = read_metrics(straight)
    assert records[0]["step"] == 0 and "val_loss" in records[0]

    other = taichu.save_model(taichu.build_model(load_config(CLIP, CLIP_TEACHER), "torch"), tmp_path / "other")
    code = main(["distill", str(CLIP), "--teacher", str(other), "--backend", "torch", "--out", str(cut),
                 "--resume", "--no-progress", *[f"--set={o}" for o in common]])
    assert code == 2
    assert "not those of the teacher this run started with" in capsys.readouterr().err


def test_distill_cli_refuses_a_teacher_of_another_family(tmp_path, capsys):
    from taichu.cli import main

    teacher = taichu.save_model(taichu.build_model(load_config(CONFIGS / "gpt" / "gpt-tiny.yaml"), "torch"),
                                tmp_path / "gpt")
    code = main(["distill", str(CLIP), "--teacher", str(teacher), "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "family" in err and "'gpt'" in err and "'clip'" in err
    assert not (tmp_path / "run").exists()                # refused before anything was written


def test_a_dalle_pair_must_share_the_image_tokenizer(tmp_path):
    """The teacher's image logits are over its tokenizer's codebook: a student reading another
    tokenizer's codes is refused, naming the key; the same weights under another path pass."""
    from taichu.distill import DistillRecipe

    dalle = CONFIGS / "dalle" / "dalle-tiny.yaml"
    teacher_dir = taichu.save_model(taichu.build_model(load_config(dalle, ["data.image_tokenizer=vq-a"]), "torch"),
                                    tmp_path / "teacher")
    with pytest.raises(ConfigError, match="data.image_tokenizer: the student reads codes of vq-b"):
        DistillRecipe(load_config(dalle, ["data.image_tokenizer=vq-b"]), teacher_dir, "torch")
    vqvae = taichu.save_model(taichu.build_model(load_config(CONFIGS / "vqvae" / "vqvae-tiny.yaml"), "torch"),
                              tmp_path / "vq-a")
    shutil.copytree(vqvae, tmp_path / "vq-copy")
    teacher_dir = taichu.save_model(taichu.build_model(load_config(dalle, [f"data.image_tokenizer={vqvae}"]), "torch"),
                                    tmp_path / "teacher2")
    DistillRecipe(load_config(dalle, [f"data.image_tokenizer={tmp_path / 'vq-copy'}"]), teacher_dir, "torch")


def test_print_launch_runs_distill_on_every_worker(capsys):
    """--print-launch N gives the msrun / torchrun command of `taichu distill`, teacher included."""
    from taichu.cli import main

    for backend, launcher in (("mindspore", "msrun --worker_num=2"), ("torch", "torchrun --nnodes=1")):
        assert main(["distill", str(CLIP), "--teacher", "runs/teacher/final", "--backend", backend,
                     "--out", "runs/x", "--print-launch", "2"]) == 0
        printed = capsys.readouterr().out
        assert printed.startswith(launcher) and " distill " in printed and " train " not in printed
        assert "--teacher runs/teacher/final" in printed and "--set=parallel.data_parallel=2" in printed
