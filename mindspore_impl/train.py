"""One optimizer step of a MindSpore model, driven by taichu/train.py.

Mirrors torch_impl/train.py: same functions, same Trainer methods, same math (AdamW below
computes torch.optim.AdamW's update, clip coefficient max_norm / (norm + 1e-6), loss
averaged over micro-batches and data-parallel ranks; the family's ``training_loss`` and
``after_step``). The step runs in graph mode through mindspore.jit unless
train.graph_mode is false.
"""
from __future__ import annotations

import os

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from mindspore_impl.weights import canonical_parameters, write_parameters
from taichu.families import backend_module, get_family
from taichu.parallel import validate_batch, validate_parallel

PRECISIONS = {"fp32": None, "bf16": ms.bfloat16, "fp16": ms.float16}
RNG_STATE_DTYPE = np.uint8


def _launched_by_msrun() -> bool:
    return os.environ.get("MS_ROLE") == "MS_WORKER" and int(os.environ.get("MS_WORKER_NUM", "1")) > 1


def distributed_init(config) -> tuple[int, int]:
    """Join the msrun cluster (data parallel works on CPU); (rank, world)."""
    if os.environ.get("MS_ROLE") == "MS_SCHED":
        # msrun runs this script once more as its scheduler: it only hosts the cluster's
        # rendezvous, which init() does until the workers are done, and must not train.
        from mindspore.communication import init

        init()
        raise SystemExit(0)
    world = int(os.environ.get("MS_WORKER_NUM", "1")) if _launched_by_msrun() else 1
    device_target = ms.get_context("device_target")
    if device_target == "CPU":
        _set_cpu_threads(max(1, (os.cpu_count() or 1) // world))
    validate_parallel(config.parallel, config.model, world, "mindspore", device_target)
    validate_batch(config.parallel, config.train.batch_size, config.train.grad_accum_steps)
    if world == 1:
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init

    from mindspore_impl.parallel import configure_auto_parallel

    init()
    configure_auto_parallel(config.parallel, device_target)
    return get_rank(), get_group_size()


def _set_cpu_threads(count: int) -> None:
    """One share of the cores per local worker (MindSpore's default is 25 op threads). A first,
    sequential measurement suggested a gain on 2 cores; a later one did not: unverified."""
    try:
        ms.device_context.cpu.op_tuning.threads_num(count)
    except RuntimeError:
        pass  # set once per process already (MindSpore refuses a second setting)


def distributed_barrier(world: int) -> None:
    if world > 1:
        # An all-reduce every rank joins works as a barrier on every device target; the
        # cluster itself is finalised by MindSpore when the process exits.
        ops.AllReduce()(ms.Tensor(np.zeros(1, np.float32)))


def seed_everything(seed: int) -> None:
    ms.set_seed(seed)


# MindSpore idiom: per-parameter work inside a compiled step goes through HyperMap. A Python
# loop or comprehension over gpt-small's 132 gradients compiled the clipping alone in ~40 s
# (CPU seconds, bench/train_gpt.py's findings); HyperMap in ~3 s, running the same kernels.
_MAP = ops.HyperMap()


def freeze(model, prefixes: tuple[str, ...]) -> list[str]:
    """Stop training the parameters whose canonical names start with ``prefixes`` (not in
    ``trainable_params``, so the Trainer leaves them out of the optimizer); returns their
    canonical names."""
    names = []
    for name, (param, _) in canonical_parameters(model).items():
        if name.startswith(prefixes):
            param.requires_grad = False
            names.append(name)
    return names


def _to_float32(x):
    # An astype to the same dtype still copies the tensor in graph mode.
    return x if x.dtype == ms.float32 else x.astype(ms.float32)


def _square_sum(grad):
    return ops.square(_to_float32(grad)).sum()


def _scale(coef, grad):
    return grad * coef.astype(grad.dtype)


def _zero(buffer):
    return ops.assign(buffer, ops.zeros_like(buffer))


def _adamw_update(update, beta1, beta2, eps, step_size, decay_scale, param, exp_avg, exp_avg_sq,
                  grad, decay):
    if grad.dtype != param.dtype:
        grad = grad.astype(param.dtype)
    update(param, exp_avg, exp_avg_sq, step_size, beta1, beta2, eps, decay * decay_scale, grad)
    return True


class AdamW(nn.Cell):
    """torch.optim.AdamW's update (bias-corrected moments, decoupled weight decay), one
    fused kernel per parameter; called inside the trainer's compiled step with the
    gradients and the learning rate, which is a graph input and so never stale.

    MindSpore idiom: the AdamWeightDecay primitive (CPU, GPU and Ascend kernels) updates
    a parameter and both moments in one pass, where mindspore.experimental.optim.AdamW
    runs about ten element-wise kernels per parameter. It has no bias correction, so the
    correction is folded into its scalars: torch's
        p <- p (1 - lr wd) - lr / c1 * m / (sqrt(v) / sqrt(c2) + eps),  c_i = 1 - beta_i^t
    equals its p <- p - s (m / (sqrt(v) + eps') + wd' p) with s = lr sqrt(c2) / c1,
    eps' = eps sqrt(c2), wd' = wd lr / s.
    """

    def __init__(self, groups: list[tuple[list, float]], betas: tuple[float, float], eps: float):
        super().__init__()
        params = [param for group, _ in groups for param in group]
        self.parameters = ms.ParameterTuple(params)
        self.exp_avg = self.parameters.clone(prefix="exp_avg", init="zeros")
        self.exp_avg_sq = self.parameters.clone(prefix="exp_avg_sq", init="zeros")
        self.state_step = ms.Parameter(ms.Tensor(0, ms.int32), name="state_step")
        self.weight_decay = tuple(float(decay) for group, decay in groups for _ in group)
        self.beta1, self.beta2 = (ms.Tensor(beta, ms.float32) for beta in betas)
        self.eps = float(eps)
        self.update = ops.AdamWeightDecay()

    def construct(self, grads, lr):
        step = self.state_step + 1
        ops.assign(self.state_step, step)
        step = step.astype(ms.float32)
        correction1 = 1.0 - ops.pow(self.beta1, step)
        correction2_sqrt = ops.sqrt(1.0 - ops.pow(self.beta2, step))
        step_size = lr * correction2_sqrt / correction1
        eps = self.eps * correction2_sqrt
        decay_scale = correction1 / correction2_sqrt  # lr / step_size
        return _MAP(ops.partial(_adamw_update, self.update, self.beta1, self.beta2, eps, step_size,
                                decay_scale),
                    self.parameters, self.exp_avg, self.exp_avg_sq, grads, self.weight_decay)


class Trainer:
    def __init__(self, model, config, decay_names: set[str], rank: int, world: int, objective=None):
        """``objective``: the module whose training_loss / after_step the model trains by
        (mindspore_impl.distill for a Distiller); None: the family's own."""
        train = config.train
        self.config, self.train = config, train
        self.rank, self.world = rank, world
        self.model = model
        self.model.set_train(True)
        self.family_module = objective or backend_module(get_family(config.family), "mindspore")
        self.training_loss = self.family_module.training_loss
        self.after_step = getattr(self.family_module, "after_step", None)
        # MindSpore parameter name -> canonical name and layer kind (for the leaf renames).
        parameters = canonical_parameters(model)
        self.names = {param.name: name for name, (param, _) in parameters.items()}
        self.kinds = {param.name: kind for param, kind in parameters.values()}
        if config.parallel.pipeline_stages > 1:
            raise NotImplementedError(
                "parallel.pipeline_stages > 1: pipeline training (mindspore.parallel.nn.Pipeline "
                "with micro-batches) is not wired into the trainer yet; the config validates and "
                "mindspore_impl.parallel sets the stages, but no step can run")
        if config.parallel.mode == "semi_auto_parallel":
            from mindspore_impl.parallel import apply_shard_strategies

            apply_shard_strategies(model, config.parallel)
        params = model.trainable_params()
        decay = [p for p in params if self.names[p.name] in decay_names]
        no_decay = [p for p in params if self.names[p.name] not in decay_names]
        self.optimizer = AdamW([(decay, train.weight_decay), (no_decay, 0.0)],
                               betas=(train.beta1, train.beta2), eps=train.eps)
        if train.precision == "bf16" and ms.get_context("device_target") == "CPU":
            raise ValueError("train.precision bf16: MindSpore's CPU kernels have no bfloat16 Gather "
                             "(the embedding lookup); use fp32 or fp16 on CPU, bf16 on Ascend")
        self.compute_dtype = PRECISIONS[train.precision]
        if self.compute_dtype is not None:
            ms.amp.auto_mixed_precision(self.model, "O2", dtype=self.compute_dtype)
        self.loss_scale = train.initial_loss_scale if train.precision == "fp16" else 1.0
        self.good_steps = 0
        self.grad_reducer = (nn.DistributedGradReducer(self.optimizer.parameters, mean=True,
                                                       degree=world) if world > 1 else None)
        self.all_reduce = ops.AllReduce() if world > 1 else None
        self.all_gather = ops.AllGather() if world > 1 else None

        # With accumulation, micro-batch gradients are summed in place into these buffers
        # inside the gradient graph (none leave it), and the apply graph reads and zeroes them.
        self.grad_sums = (self.optimizer.parameters.clone(prefix="grad_sum", init="zeros")
                          if train.grad_accum_steps > 1 else None)
        self._grad_fn = ms.value_and_grad(self._scaled_loss, None, self.optimizer.parameters,
                                          has_aux=True)
        jit = ms.jit if train.graph_mode else (lambda fn: fn)
        self._accumulate = jit(self._accumulate_impl)
        self._apply_sums = jit(self._apply_sums_impl)
        self._fused_step = jit(self._fused_step_impl)
        self._eval = jit(self._loss)
        self._eval_outputs = None

    def _loss(self, *inputs):
        return self.training_loss(self.model, *inputs)[0]

    def _outputs(self, *inputs):
        return self.training_loss(self.model, *inputs)

    def _scaled_loss(self, scale, *inputs):
        # (scaled loss, loss, *outputs): value_and_grad differentiates the first and
        # carries the rest (has_aux).
        outputs = self.training_loss(self.model, *inputs)
        return (outputs[0] * scale,) + outputs

    def _accumulate_impl(self, scale, *inputs):
        outputs, grads = self._grad_fn(scale, *inputs)
        # MindSpore idiom: a branch (always taken: scale > 0) puts the in-place additions into
        # a kernel graph of their own. In one graph with the 132 AssignAdds every gradient
        # MatMul ran ~1.8x slower: 2.15 -> 1.45 s a micro-batch of 4 x 256 at gpt-small on 2
        # cores, where the fused step with clipping and AdamW takes 1.65 s (bench/train_gpt.py's
        # findings; why, inside MindSpore's CPU runtime, is not known).
        if scale > 0:
            _MAP(ops.assign_add, self.grad_sums, grads)
        return outputs[1:]

    def _apply_impl(self, grads, unscale, max_norm, lr):
        """Unscale (fp16), clip to max_norm by the global norm, AdamW; the unscaled norm."""
        if self.grad_reducer is not None:
            grads = self.grad_reducer(grads)
        # Not L2Loss (one kernel instead of Square + ReduceSum): its CPU kernel sums in plain
        # fp32, 1% off at 16000 x 512. unscale is a power of two, so scaling the norm equals
        # unscaling every gradient first (torch's order) exactly.
        norm = ops.sqrt(ops.addn(_MAP(_square_sum, grads))) * unscale
        finite = ops.isfinite(norm)
        # Unscale and clip in one multiplication per gradient.
        coef = ops.minimum(max_norm / (norm + 1e-6), 1.0) * unscale
        grads = _MAP(ops.partial(_scale, coef), grads)
        # A step with overflowed (fp16) gradients is skipped, as torch's GradScaler does.
        if finite:
            self.optimizer(grads, lr)
        return norm

    def _apply_sums_impl(self, unscale, max_norm, lr):
        norm = self._apply_impl(tuple(self.grad_sums), unscale, max_norm, lr)
        _MAP(_zero, self.grad_sums)
        return norm

    def _fused_step_impl(self, scale, unscale, max_norm, lr, *inputs):
        # Without accumulation one graph does it all: gradients never leave the graph.
        outputs, grads = self._grad_fn(scale, *inputs)
        return outputs[1:], self._apply_impl(grads, unscale, max_norm, lr)

    def _tensors(self, batch: dict[str, np.ndarray]) -> list:
        # Integer inputs (ids, masks) as int32: what MindSpore's CPU Gather takes.
        return [ms.Tensor(x.astype(np.int32) if np.issubdtype(x.dtype, np.integer) else x)
                for x in batch.values()]

    def _gather(self, outputs: list[tuple]) -> tuple:
        """Each output of the micro-batches, concatenated, then across ranks in rank order:
        the global batch in the order of the single-process run."""
        merged = tuple(ops.cat(parts) for parts in zip(*outputs))
        if self.all_gather is None:
            return merged
        return tuple(self.all_gather(x) for x in merged)

    def train_step(self, micro_batches: list[dict[str, np.ndarray]], lr: float) -> tuple[float, float]:
        """Forward/backward over the micro-batches, then clip and step; (loss, grad norm)."""
        lr = ms.Tensor(lr, ms.float32)
        count = len(micro_batches)
        scale = ms.Tensor(self.loss_scale / count, ms.float32)
        unscale = ms.Tensor(1.0 / self.loss_scale, ms.float32)
        max_norm = ms.Tensor(self.train.max_grad_norm or float("inf"), ms.float32)
        if count > 1 and self.grad_sums is None:
            raise ValueError(f"{count} micro-batches, but train.grad_accum_steps is 1: the "
                             "trainer keeps gradient sums only when accumulation is configured")
        if count == 1:
            outputs, grad_norm = self._fused_step(scale, unscale, max_norm, lr,
                                                  *self._tensors(micro_batches[0]))
            loss, grad_norm = float(outputs[0]), float(grad_norm)
            extras = [tuple(outputs[1:])]
        else:
            losses, extras = [], []
            for batch in micro_batches:
                outputs = self._accumulate(scale, *self._tensors(batch))
                # Reading the loss waits for this micro-batch's graph. Launches are
                # asynchronous: without the wait the next micro-batch's graph starts while this
                # one runs, each with all the op threads, and on 2 cores the step took 6.8 s
                # instead of 3.3 (gpt-small, 2 x 4 x 256).
                losses.append(float(outputs[0]))
                extras.append(tuple(outputs[1:]))
            grad_norm = float(self._apply_sums(unscale, max_norm, lr))
            loss = sum(losses) / count
        if self.after_step is not None:
            self.after_step(self.model, *self._gather(extras))
        self.step_outputs = extras
        if self.all_reduce is not None:
            loss = float(self.all_reduce(ms.Tensor(np.array([loss], np.float32)))[0]) / self.world
        self._update_loss_scale(np.isfinite(grad_norm))
        return loss, grad_norm

    def _update_loss_scale(self, finite: bool) -> None:
        """Dynamic loss scaling for fp16, with GradScaler's defaults (x0.5 / x2 per 2000)."""
        if self.train.precision != "fp16":
            return
        if not finite:
            self.loss_scale, self.good_steps = self.loss_scale * 0.5, 0
        else:
            self.good_steps += 1
            if self.good_steps == 2000:
                self.loss_scale, self.good_steps = self.loss_scale * 2.0, 0

    def eval_loss(self, batch: dict[str, np.ndarray]) -> float:
        self.model.set_train(False)
        try:
            return float(self._eval(*self._tensors(batch)))
        finally:
            self.model.set_train(True)

    def eval_outputs(self, batch: dict[str, np.ndarray]) -> tuple[float, tuple[np.ndarray, ...]]:
        """(loss, the loss's other outputs as numpy) in evaluation mode."""
        if self._eval_outputs is None:   # a graph of its own, compiled when first needed
            self._eval_outputs = (ms.jit if self.train.graph_mode else (lambda fn: fn))(self._outputs)
        self.model.set_train(False)
        try:
            loss, *outputs = self._eval_outputs(*self._tensors(batch))
            return float(loss), tuple(x.asnumpy().copy() for x in outputs)   # as last_outputs
        finally:
            self.model.set_train(True)

    def last_outputs(self) -> list[tuple[np.ndarray, ...]]:
        """The last train_step's outputs after the loss, per micro-batch, as numpy (the
        state a model carries to the next step: taichu.train's TrainingData.carry)."""
        # Copies: on CPU asnumpy may share the output's buffer with MindSpore, and the loop
        # keeps these arrays a whole step (and writes them into checkpoints).
        return [tuple(x.asnumpy().copy() for x in outputs) for outputs in self.step_outputs]

    def gather_rows(self, parts: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...] | None:
        """Per-micro-batch arrays -> each concatenated over the micro-batches and the ranks,
        in the global batch's row order, on rank 0 (None elsewhere). Every rank calls it."""
        gathered = self._gather([tuple(ms.Tensor(np.ascontiguousarray(x)) for x in part) for part in parts])
        return tuple(x.asnumpy() for x in gathered) if self.rank == 0 else None

    def full_state(self) -> tuple[dict | None, dict | None]:
        """(model arrays, optimizer arrays), canonical, on rank 0 (None elsewhere)."""
        if self.rank != 0:
            return None, None
        from mindspore_impl.weights import canonical_state_dict

        return canonical_state_dict(self.model), self.optimizer_state()

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """AdamW moments under canonical names (exp_avg/NAME, exp_avg_sq/NAME) and the step."""
        from taichu.weights import from_mindspore_array

        arrays = {}

        for key, moments in (("exp_avg", self.optimizer.exp_avg),
                             ("exp_avg_sq", self.optimizer.exp_avg_sq)):
            for param, moment in zip(self.optimizer.parameters, moments):
                arrays[f"{key}/{self.names[param.name]}"] = from_mindspore_array(
                    moment.asnumpy(), self.kinds[param.name]).copy()
        arrays["step"] = np.array([int(self.optimizer.state_step.asnumpy())], np.int64)
        return arrays

    def load_optimizer_state(self, arrays: dict[str, np.ndarray]) -> None:
        from taichu.weights import contiguous, to_mindspore_array

        staged = []
        for key, moments in (("exp_avg", self.optimizer.exp_avg),
                             ("exp_avg_sq", self.optimizer.exp_avg_sq)):
            for param, moment in zip(self.optimizer.parameters, moments):
                array = to_mindspore_array(arrays[f"{key}/{self.names[param.name]}"], self.kinds[param.name])
                staged.append((moment, ms.Tensor(contiguous(array), moment.dtype)))
        staged.append((self.optimizer.state_step, ms.Tensor(int(arrays["step"][0]), ms.int32)))
        write_parameters(staged)

    def extra_state(self) -> dict:
        """JSON-able state beside the weights: the fp16 loss scale.

        MindSpore's CPU dropout kernels keep their random streams internally, and
        mindspore.get_rng_state does not capture them: a resumed run with dropout > 0
        draws different masks from the uninterrupted one (fp32 losses then differ).
        """
        return {"loss_scale": self.loss_scale, "good_steps": self.good_steps,
                "rng": ms.get_rng_state().asnumpy().tolist()}

    def load_extra_state(self, state: dict) -> None:
        self.loss_scale, self.good_steps = state["loss_scale"], state["good_steps"]
        ms.set_rng_state(ms.Tensor(np.array(state["rng"], dtype=RNG_STATE_DTYPE)))
