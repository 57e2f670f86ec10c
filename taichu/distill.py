"""``taichu distill``: a student learns from a trained teacher, TinyBERT style (design.md §2.4).

One mechanism for every family whose config class has a ``distill`` section and whose
Family names its Transformer stacks (``distill_streams``): the backend files'
``distill_outputs(model, *inputs)`` give, from one forward pass, the family's own training
loss, its prediction logits and per stack the hidden states and attention scores; the
Distiller of ``torch_impl/distill.py`` / ``mindspore_impl/distill.py`` runs student and
(frozen) teacher on the same batch and combines

    total = a1 * L_kd + a2 * L_student
    L_kd  = w_e MSE(E_S W_e, E_T) + sum_m [w_h MSE(H_S^m W_h, H_T^g(m)) + w_a MSE(A_S^m, A_T^g(m))]
            + w_p soft-CE(z_S / t, z_T / t)

Here: the layer map g, the checks that the pair can be distilled (each naming the config key
at fault), the per-step loss weights (TinyBERT's two stages), and the recipe that lets
``taichu train``'s loop (taichu/train.py) train the Distiller: the same logging, checkpoints,
resume and data parallelism. A checkpoint is the student's model directory plus the learned
projections (``distill.safetensors``); ``final/`` is the student alone.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taichu.config import ConfigError, DistillConfig, load_config
from taichu.families import get_family

PROJECTIONS_FILE = "distill.safetensors"
TEACHER_RECORD = "teacher.json"
# Order of the per-step weight vector the backends read (a graph input, so that the second
# stage does not recompile): the four L_kd terms, a1, a2.
WEIGHT_NAMES = ("embedding", "hidden", "attention", "prediction", "kd", "student")


@dataclass(frozen=True)
class StreamPlan:
    """How one Transformer stack of the student learns from the teacher's."""
    name: str
    student_width: int
    teacher_width: int
    layer_map: tuple[int, ...]   # teacher layer (1-based) for student layers 1..M
    head_group: int              # teacher heads averaged into each student head
    causal: bool

    @property
    def projected(self) -> bool:
        """W_e and W_h exist only when the widths differ."""
        return self.student_width != self.teacher_width


def uniform_layer_map(student_layers: int, teacher_layers: int) -> tuple[int, ...]:
    """TinyBERT's uniform strategy: student layer m learns from teacher layer floor(m N / M),
    so the last student layer always learns from the teacher's last."""
    return tuple(m * teacher_layers // student_layers for m in range(1, student_layers + 1))


def _check_image_tokenizer(student, teacher, teacher_dir: Path) -> None:
    """A text-to-image pair must read the codes of one image tokenizer: the teacher's image
    logits are over its codebook."""
    mine = getattr(student.data, "image_tokenizer", None)
    theirs = getattr(teacher.data, "image_tokenizer", None)
    if mine is None or theirs is None or mine == theirs:
        return
    same = (Path(mine).is_dir() and Path(theirs).is_dir()
            and weights_fingerprint(Path(mine)) == weights_fingerprint(Path(theirs)))
    if not same:
        raise ConfigError(f"data.image_tokenizer: the student reads codes of {mine}, the teacher "
                          f"({teacher_dir}) was trained on codes of {theirs}; set data.image_tokenizer="
                          f"{theirs}")


def distill_settings(config) -> DistillConfig:
    return config.distill if config.distill is not None else DistillConfig()


def plan_distillation(student, teacher, teacher_source: str = "teacher") -> tuple[StreamPlan, ...]:
    """The per-stream plan for distilling ``teacher`` (a config) into ``student``, or a
    ConfigError naming the key that makes it impossible."""
    if student.family != teacher.family:
        raise ConfigError(f"{teacher_source}: family: the teacher is a '{teacher.family}' model, the "
                          f"student a '{student.family}' model; distillation compares the same "
                          f"family's hidden states and predictions")
    family = get_family(student.family)
    if family.distill_streams is None:
        raise ConfigError(f"family '{student.family}' cannot be distilled yet (its model does not "
                          f"expose hidden states and attention scores: Family.distill_streams)")
    for key in family.distill_shared_keys:
        mine, theirs = _field(student, key), _field(teacher, key)
        if mine != theirs:
            raise ConfigError(f"{key}: the student has {mine}, the teacher ({teacher_source}) {theirs}; "
                              f"both must read the same inputs, position for position")
    settings = distill_settings(student)
    student_streams = family.distill_streams(student)
    teacher_streams = {s.name: s for s in family.distill_streams(teacher)}
    unknown = sorted(set(settings.layer_map) - {s.name for s in student_streams})
    if unknown:
        raise ConfigError(f"distill.layer_map: unknown stream {unknown[0]!r} (the {student.family} "
                          f"model's streams: {', '.join(s.name for s in student_streams)})")
    plans = []
    for mine in student_streams:
        theirs = teacher_streams[mine.name]
        key = f"distill.layer_map.{mine.name}"
        if mine.name in settings.layer_map:
            layer_map = tuple(settings.layer_map[mine.name])
            if len(layer_map) != mine.num_layers:
                raise ConfigError(f"{key}: {len(layer_map)} entries for the student's "
                                  f"{mine.num_layers} layers (one teacher layer per student layer)")
            bad = [g for g in layer_map if not 1 <= g <= theirs.num_layers]
            if bad:
                raise ConfigError(f"{key}: teacher layer {bad[0]} is out of range: the teacher's "
                                  f"{mine.name} stack has layers 1..{theirs.num_layers}")
        else:
            if mine.num_layers > theirs.num_layers:
                raise ConfigError(f"{key}: the student's {mine.name} stack has {mine.num_layers} layers, "
                                  f"the teacher's {theirs.num_layers}; a uniform map needs a teacher at "
                                  f"least as deep: list the teacher layer of each student layer")
            layer_map = uniform_layer_map(mine.num_layers, theirs.num_layers)
        plans.append(StreamPlan(mine.name, mine.hidden_size, theirs.hidden_size, layer_map,
                                _head_group(mine, theirs, settings), mine.causal))
    return tuple(plans)


def _head_group(mine, theirs, settings) -> int:
    if mine.num_heads == theirs.num_heads:
        return 1
    where = f"the {mine.name} stack: student {mine.num_heads} heads, teacher {theirs.num_heads}"
    if settings.attention_heads == "refuse":
        raise ConfigError(f"distill.attention_heads: refuse, and the head counts differ ({where}); "
                          f"set distill.attention_heads: group_mean or distill.attention_weight: 0")
    if theirs.num_heads % mine.num_heads:
        raise ConfigError(f"distill.attention_heads: group_mean needs the teacher's heads to be a "
                          f"multiple of the student's ({where}); set distill.attention_weight: 0 "
                          f"to distil without attention scores, or change a model's num_heads")
    return theirs.num_heads // mine.num_heads


def _field(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def step_weights(settings: DistillConfig, step: int | None) -> np.ndarray:
    """The WEIGHT_NAMES vector for a training step (None: validation, where only the
    student's own loss counts, so val_loss compares with a run of the student alone).

    Two stages (intermediate_steps > 0): the intermediate terms first, then the
    predictions and the student's own loss, as TinyBERT trains them."""
    s = settings
    if step is None:
        weights = (0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    elif step < s.intermediate_steps:
        weights = (s.embedding_weight, s.hidden_weight, s.attention_weight, 0.0, s.kd_weight, 0.0)
    elif s.intermediate_steps:
        weights = (0.0, 0.0, 0.0, s.prediction_weight, s.kd_weight, s.student_weight)
    else:
        weights = (s.embedding_weight, s.hidden_weight, s.attention_weight, s.prediction_weight,
                   s.kd_weight, s.student_weight)
    return np.asarray(weights, np.float32)


class WeightedBatches:
    """A task's batches with the step's loss weights in front (``distill_weights``, the
    first input of the backends' distillation ``training_loss``)."""

    stochastic = True   # batch(indices, step): the weights depend on the step

    def __init__(self, inner, settings: DistillConfig):
        self.inner, self.settings = inner, settings

    def __len__(self) -> int:
        return len(self.inner)

    def batch(self, indices, step: int | None = None) -> dict[str, np.ndarray]:
        inner = (self.inner.batch(indices, step) if getattr(self.inner, "stochastic", False)
                 else self.inner.batch(indices))
        return {"distill_weights": step_weights(self.settings, step), **inner}


def initial_projections(plans, seed: int) -> dict[str, np.ndarray]:
    """W_e and W_h of every stream whose widths differ, N(0, student_width^-0.5) (unit-variance
    features stay unit variance), drawn in numpy from the seed so that both backends start
    from the same projections. Canonical names: ``projections.i.{embedding,hidden}.weight``
    with torch's [out, in] layout."""
    rng = np.random.default_rng([seed, 1804])
    arrays = {}
    for i, plan in enumerate(plans):
        if plan.projected:
            for part in ("embedding", "hidden"):
                arrays[f"projections.{i}.{part}.weight"] = rng.normal(
                    0.0, plan.student_width ** -0.5, (plan.teacher_width, plan.student_width)).astype(np.float32)
    return arrays


def weights_fingerprint(model_dir: Path) -> str:
    """sha256 over a model directory's weight files (what resume checks the teacher by)."""
    from taichu.fileio import sha256_file
    from taichu.weights import weight_files

    digest = hashlib.sha256()
    for path in weight_files(Path(model_dir)):
        digest.update(f"{path.name}:{sha256_file(path)}".encode())
    return digest.hexdigest()


class DistillRecipe:
    """What ``run_training`` trains for ``taichu distill``: the student (loaded, initialised
    and resumed like any model), wrapped with the frozen teacher and the projections."""

    def __init__(self, config, teacher_dir, backend: str):
        self.config, self.backend = config, backend
        self.teacher_dir = Path(teacher_dir)
        if not (self.teacher_dir / "config.yaml").is_file():
            raise ConfigError(f"--teacher {self.teacher_dir}: not a model directory (no config.yaml)")
        self.teacher_config = load_config(self.teacher_dir)
        self.settings = distill_settings(config)
        self.plans = plan_distillation(config, self.teacher_config, str(self.teacher_dir / "config.yaml"))
        _check_image_tokenizer(config, self.teacher_config, self.teacher_dir)
        if config.parallel.fsdp:
            raise ConfigError("parallel.fsdp: taichu distill trains with DDP (torchrun) or msrun "
                              "data parallelism; FSDP would shard the frozen teacher too")

    def tokenizer_dir(self, init_dir: Path | None) -> Path:
        """The teacher's tokenizer: its ids are what the teacher was trained on. An --init
        student must have the same one."""
        mine = self.teacher_dir / "tokenizer.model"
        if init_dir is not None and (init_dir / "tokenizer.model").is_file() and mine.is_file():
            if (init_dir / "tokenizer.model").read_bytes() != mine.read_bytes():
                raise ConfigError(f"--init {init_dir}: its tokenizer.model differs from the teacher's "
                                  f"({mine}); the student must read the teacher's token ids")
        return self.teacher_dir

    def wrap_data(self, data):
        from dataclasses import replace

        return replace(data, train=WeightedBatches(data.train, self.settings),
                       validation=WeightedBatches(data.validation, self.settings))

    def start(self, out_dir: Path, resuming: bool, is_main: bool) -> None:
        """Record the teacher (fresh run) or check it is the recorded one (resume)."""
        # Hashing reads every weight of the teacher: only where it is compared or recorded.
        record_path = out_dir / TEACHER_RECORD
        if resuming and record_path.is_file():
            recorded = json.loads(record_path.read_text())
            if recorded["weights_sha256"] != weights_fingerprint(self.teacher_dir):
                raise ConfigError(f"--teacher {self.teacher_dir}: its weights are not those of the "
                                  f"teacher this run started with ({recorded['teacher']}); resume "
                                  f"with the same teacher")
        elif is_main:
            record = {"teacher": str(self.teacher_dir), "weights_sha256": weights_fingerprint(self.teacher_dir),
                      "streams": [vars(plan) for plan in self.plans]}
            record_path.write_text(json.dumps(record, indent=1))

    def wrap(self, student, resume_from: Path | None):
        """The Distiller around ``student`` (already initialised or resumed)."""
        import importlib

        from taichu.api import load_model
        from taichu.weights import load_safetensors

        module = importlib.import_module(f"{self.backend}_impl.distill")
        teacher = load_model(self.teacher_dir, backend=self.backend)
        model = module.Distiller(student, teacher, self.plans, self.settings.temperature)
        if resume_from is not None and any(plan.projected for plan in self.plans):
            module.load_projections(model, load_safetensors(resume_from / PROJECTIONS_FILE))
        else:
            module.load_projections(model, initial_projections(self.plans, self.config.train.seed))
        return model

    def objective(self):
        import importlib

        return importlib.import_module(f"{self.backend}_impl.distill")

    def decay_names(self, names: set[str]) -> set[str]:
        """The student's decayed weights under the Distiller's names, and the projections."""
        projections = {f"projections.{i}.{part}.weight" for i, plan in enumerate(self.plans)
                       if plan.projected for part in ("embedding", "hidden")}
        return {f"student.{name}" for name in names} | projections

    def split(self, arrays: dict) -> tuple[dict, dict]:
        """The Distiller's canonical arrays -> (the student's, extra files: the projections).
        The teacher is not written: it is the --teacher directory."""
        student = {name[len("student."):]: a for name, a in arrays.items() if name.startswith("student.")}
        projections = {name: a for name, a in arrays.items() if name.startswith("projections.")}
        return student, ({PROJECTIONS_FILE: projections} if projections else {})


def run_distillation(config, teacher_dir, backend: str, out_dir, init_dir=None, resume: bool = False,
                     progress: bool = True):
    """Distil ``teacher_dir`` into a student of ``config``; returns taichu.train.TrainResult."""
    from taichu.train import run_training

    recipe = DistillRecipe(config, teacher_dir, backend)
    return run_training(config, backend, out_dir, init_dir=init_dir, resume=resume, progress=progress,
                        recipe=recipe)
