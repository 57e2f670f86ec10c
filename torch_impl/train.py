"""One optimizer step of a PyTorch model, driven by taichu/train.py.

Mirrored by mindspore_impl/train.py: same functions, same Trainer methods, same math
(AdamW with torch's semantics, clip coefficient max_norm / (norm + 1e-6), loss averaged
over micro-batches and data-parallel ranks). The loss is the family's: its backend file
has ``training_loss(model, *inputs) -> (loss, *outputs)`` and, if the model keeps state
beside its parameters (MoCo queues, momentum towers, a clamped temperature),
``after_step(model, *outputs)``, called after every update with the outputs of the whole
global batch.
"""
from __future__ import annotations

import base64
import contextlib
import os

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from taichu.families import backend_module, get_family
from taichu.parallel import validate_batch, validate_parallel
from torch_impl.parallel import wrap_data_parallel

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def distributed_init(config) -> tuple[int, int]:
    """Join the process group torchrun set up (gloo on CPU, nccl on GPU); (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = _device()
    validate_parallel(config.parallel, config.model, world, "torch",
                      "GPU" if device.type == "cuda" else "CPU")
    validate_batch(config.parallel, config.train.batch_size, config.train.grad_accum_steps)
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def distributed_barrier(world: int) -> None:
    if world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


class TrainingStep(nn.Module):
    """A family's training_loss as a module's forward: what DDP wraps, so that its
    gradient hooks are armed whichever parts of the model the loss runs (BriVL runs its
    towers and momentum towers, never its forward)."""

    def __init__(self, model: nn.Module, training_loss):
        super().__init__()
        self.model = model
        self.training_loss = training_loss

    def forward(self, *inputs):
        return self.training_loss(self.model, *inputs)


def freeze(model: nn.Module, prefixes: tuple[str, ...]) -> list[str]:
    """Stop training the parameters whose canonical names start with ``prefixes`` (the
    Trainer leaves them out of the optimizer); returns their names."""
    names = [name for name, p in model.named_parameters() if name.startswith(prefixes)]
    for name, p in model.named_parameters():
        if name in names:
            p.requires_grad_(False)
    return names


def _numpy(x: torch.Tensor) -> np.ndarray:
    x = x.detach().cpu()
    return (x.float() if x.is_floating_point() else x).numpy()


class Trainer:
    def __init__(self, model, config, decay_names: set[str], rank: int, world: int, objective=None):
        """``objective``: the module whose training_loss / after_step the model trains by
        (torch_impl.distill for a Distiller); None: the family's own."""
        train = config.train
        self.config, self.train = config, train
        self.rank, self.world = rank, world
        self.device = _device()
        self.model = model.to(self.device)
        self.model.train()
        self.family_module = objective or backend_module(get_family(config.family), "torch")
        self.after_step = getattr(self.family_module, "after_step", None)
        # Only what the optimizer trains: BriVL's momentum towers follow by after_step.
        self.names = [name for name, p in self.model.named_parameters() if p.requires_grad]
        self.fsdp = world > 1 and config.parallel.fsdp
        self.step = TrainingStep(self.model, self.family_module.training_loss)
        # FSDP shards the model itself (root and blocks), and its losses call forward;
        # DDP wraps the whole loss, so its hooks see every tower the loss runs.
        self.module = (wrap_data_parallel(self.model, config.parallel, world, self.device)
                       if self.fsdp else wrap_data_parallel(self.step, config.parallel, world, self.device))
        params = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        decay = [p for name, p in params.items() if name in decay_names]
        no_decay = [p for name, p in params.items() if name not in decay_names]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": train.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=train.learning_rate, betas=(train.beta1, train.beta2), eps=train.eps)
        self.autocast_dtype = PRECISIONS[train.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=train.initial_loss_scale,
                                           enabled=train.precision == "fp16")

    def _loss(self, module, batch: dict[str, np.ndarray]):
        """(loss, *outputs) of the family's training_loss on one micro-batch, through
        ``module``: the DDP-wrapped TrainingStep (or the FSDP model) in training."""
        inputs = [torch.from_numpy(np.ascontiguousarray(x)).to(self.device) for x in batch.values()]
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            if module is self.model:
                return self.family_module.training_loss(module, *inputs)
            return module(*inputs)

    def _gather(self, outputs: list[tuple]) -> tuple:
        """Each output of the micro-batches, concatenated, then across ranks in rank order:
        the global batch in the order of the single-process run."""
        merged = tuple(torch.cat(parts) for parts in zip(*outputs))
        if self.world == 1:
            return merged
        gathered = []
        for x in merged:
            parts = [torch.empty_like(x) for _ in range(self.world)]
            dist.all_gather(parts, x.contiguous())
            gathered.append(torch.cat(parts))
        return tuple(gathered)

    def train_step(self, micro_batches: list[dict[str, np.ndarray]], lr: float) -> tuple[float, float]:
        """Forward/backward over the micro-batches, then clip and step; (loss, grad norm)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        count = len(micro_batches)
        total = torch.zeros((), device=self.device)
        outputs = []
        for i, batch in enumerate(micro_batches):
            # Gradients are all-reduced once, on the last micro-batch.
            last = i == count - 1
            if self.fsdp:
                self.model.set_requires_gradient_sync(last)
            plain = self.world == 1 or last or self.fsdp
            with contextlib.nullcontext() if plain else self.module.no_sync():
                loss, *extra = self._loss(self.module, batch)
                self.scaler.scale(loss / count).backward()
            total += loss.detach()
            outputs.append(tuple(x.detach() for x in extra))
        self.scaler.unscale_(self.optimizer)
        max_norm = self.train.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad], max_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.after_step is not None:
            self.after_step(self.model, *self._gather(outputs))
        self.step_outputs = outputs
        loss = total / count
        if self.world > 1:
            dist.all_reduce(loss)
            loss = loss / self.world
        return float(loss), float(grad_norm)

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, np.ndarray]) -> float:
        return float(self._eval(batch)[0])

    @torch.no_grad()
    def eval_outputs(self, batch: dict[str, np.ndarray]) -> tuple[float, tuple[np.ndarray, ...]]:
        """(loss, the loss's other outputs as numpy) in evaluation mode."""
        loss, *outputs = self._eval(batch)
        return float(loss), tuple(_numpy(x) for x in outputs)

    def _eval(self, batch: dict[str, np.ndarray]) -> tuple:
        """The loss's outputs in evaluation mode, as tensors (eval_loss copies none of the
        other outputs to numpy: BriVL's features, a GPT-XL's memory)."""
        self.model.eval()
        try:
            return self._loss(self.step, batch)
        finally:
            self.model.train()

    def last_outputs(self) -> list[tuple[np.ndarray, ...]]:
        """The last train_step's outputs after the loss, per micro-batch, as numpy (the
        state a model carries to the next step: taichu.train's TrainingData.carry)."""
        return [tuple(_numpy(x) for x in outputs) for outputs in self.step_outputs]

    def gather_rows(self, parts: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...] | None:
        """Per-micro-batch arrays -> each concatenated over the micro-batches and the ranks,
        in the global batch's row order, on rank 0 (None elsewhere). Every rank calls it."""
        gathered = self._gather([tuple(torch.from_numpy(np.ascontiguousarray(x)).to(self.device) for x in part)
                                 for part in parts])
        return tuple(_numpy(x) for x in gathered) if self.rank == 0 else None

    def full_state(self) -> tuple[dict | None, dict | None]:
        """(model arrays, optimizer arrays), canonical, gathered on rank 0 (None elsewhere).

        Every rank must call it: under FSDP the shards are gathered collectively.
        """
        if not self.fsdp:
            if self.rank != 0:
                return None, None
            from torch_impl.weights import canonical_state_dict

            return canonical_state_dict(self.model), self.optimizer_state()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None, None
        arrays = {}
        for name, state in optim_sd["state"].items():
            arrays[f"exp_avg/{name}"] = state["exp_avg"].numpy()
            arrays[f"exp_avg_sq/{name}"] = state["exp_avg_sq"].numpy()
            arrays["step"] = np.array([int(state["step"])], np.int64)
        return {k: v.numpy() for k, v in model_sd.items()}, arrays

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """AdamW moments under canonical names (exp_avg/NAME, exp_avg_sq/NAME) and the step."""
        arrays, step = {}, 0
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            state = self.optimizer.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq"):
                value = state.get(key)
                arrays[f"{key}/{name}"] = (np.zeros(param.shape, np.float32) if value is None
                                           else value.detach().cpu().numpy())
            step = int(state["step"]) if "step" in state else step
        arrays["step"] = np.array([step], np.int64)
        return arrays

    def load_optimizer_state(self, arrays: dict[str, np.ndarray]) -> None:
        step = int(arrays["step"][0])
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                 set_optimizer_state_dict)

            names = self.names
            state = {name: {"step": torch.tensor(float(step)),
                            "exp_avg": torch.from_numpy(arrays[f"exp_avg/{name}"].copy()),
                            "exp_avg_sq": torch.from_numpy(arrays[f"exp_avg_sq/{name}"].copy())}
                     for name in names}
            groups = [{**{k: v for k, v in g.items() if k != "params"},
                       "params": [n for n, p in self.model.named_parameters()
                                  if p.requires_grad and any(p is q for q in g["params"])]}
                      for g in self.optimizer.param_groups]
            set_optimizer_state_dict(self.model, self.optimizer, {"state": state, "param_groups": groups},
                                     options=StateDictOptions(full_state_dict=True))
            return
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            self.optimizer.state[param] = {
                "step": torch.tensor(float(step)),
                "exp_avg": torch.from_numpy(arrays[f"exp_avg/{name}"].copy()).to(self.device),
                "exp_avg_sq": torch.from_numpy(arrays[f"exp_avg_sq/{name}"].copy()).to(self.device),
            }

    def extra_state(self) -> dict:
        """JSON-able state beside the weights: RNG (dropout) and the fp16 loss scaler."""
        state = {"rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
        if self.scaler.is_enabled():
            state["scaler"] = {k: float(v) if isinstance(v, (int, float)) else v
                               for k, v in self.scaler.state_dict().items()}
        return state

    def load_extra_state(self, state: dict) -> None:
        rng = np.frombuffer(base64.b64decode(state["rng"]), dtype=np.uint8).copy()
        torch.set_rng_state(torch.from_numpy(rng))
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
