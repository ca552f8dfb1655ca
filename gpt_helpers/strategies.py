"""Transfer-learning strategies: what to train of a pre-trained model, and how fast each part learns.

Every strategy here works on GPT-2-family models and on other decoder-only architectures (GPT-NeoX, Llama…):

* :func:`freeze` — freeze the embeddings, the lower *k* blocks, or everything but the top / the head;
* :func:`discriminative_param_groups` — ULMFiT's layer-wise learning rates (each block below learns 2.6× slower);
* :class:`GradualUnfreezing` — a callback that unfreezes one more block from the top every N steps of one run;
* :func:`apply_lora` / :func:`merge_lora` / :func:`save_merged` — low-rank adapters with ``peft``;
* :func:`from_scratch` — the same architecture, randomly initialised: the baseline every strategy must beat;
* :func:`prepare_strategy` — any of them by name (:mod:`gpt_helpers.experiments` compares them).

A model is seen as levels, bottom to top: ``embeddings`` (token and position embeddings), ``block 0`` …
``block L-1``, ``head`` (final norm, and the output layer when it is not tied to the token embeddings).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.pytorch_utils import Conv1D

from . import checkpoints
from .architecture import base_model, head_is_tied, lora_target_modules, model_levels, transformer_blocks
from .errors import ConfigError
from .history import History
from .models import ParameterCount, build_model_from_config, count_parameters

logger = logging.getLogger(__name__)

STRATEGIES = (
    "full",
    "head_only",
    "frozen_body",
    "top_quarter",
    "freeze_lower_half",
    "discriminative",
    "gradual_unfreezing",
    "lora",
    "lora_mlp",
    "from_scratch",
)
ULMFIT_DECAY = 2.6


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def _set_trainable(parameters, trainable: bool) -> None:
    for parameter in parameters:
        parameter.requires_grad_(trainable)


# ------------------------------------------------------------------------------------------ freezing
def freeze(
    model: torch.nn.Module,
    *,
    embeddings: bool = False,
    lower_blocks: int = 0,
    all_but_head: bool = False,
    keep_last_blocks: int | None = None,
) -> ParameterCount:
    """Set which parameters train (starting from all of them) and return the trainable / total count.

    * ``embeddings=True`` freezes token and position embeddings;
    * ``lower_blocks=k`` freezes the bottom *k* transformer blocks;
    * ``keep_last_blocks=n`` trains only the top *n* blocks, the final norm and an untied output layer;
    * ``all_but_head=True`` trains only the output layer and the final norm. GPT-2 ties its output layer to
      the token embeddings (``lm_head.weight is transformer.wte.weight``), so there "the head" is that shared
      vocabulary × hidden matrix — a third of GPT-2's parameters — and training it changes the input embeddings
      too. For a genuinely small trainable top on a tied model, use ``keep_last_blocks=1``.

    >>> from gpt_helpers.models import build_model_from_config, tiny_gpt2_config
    >>> model = build_model_from_config(tiny_gpt2_config(n_layer=4))
    >>> freeze(model, embeddings=True, lower_blocks=2).trainable < count_parameters(model).total
    True
    """
    if _is_peft(model):
        raise ConfigError(
            "This is a LoRA (peft) model: its base is already frozen. Call freeze() before apply_lora(), or not at all."
        )
    levels = model_levels(model)
    n_blocks = len(levels) - 2
    if all_but_head and (embeddings or lower_blocks or keep_last_blocks is not None):
        raise ConfigError(
            "all_but_head=True already freezes everything else: do not combine it with embeddings, lower_blocks or keep_last_blocks."
        )
    if keep_last_blocks is not None:
        if lower_blocks:
            raise ConfigError("Use either lower_blocks or keep_last_blocks, not both.")
        if not 1 <= keep_last_blocks <= n_blocks:
            raise ConfigError(
                f"keep_last_blocks must be between 1 and {n_blocks} (the model's blocks), not {keep_last_blocks}."
            )
        embeddings, lower_blocks = True, n_blocks - keep_last_blocks
    if not 0 <= lower_blocks <= n_blocks:
        raise ConfigError(f"lower_blocks must be between 0 and {n_blocks} (the model's blocks), not {lower_blocks}.")
    _set_trainable(model.parameters(), not all_but_head)
    if all_but_head:
        _set_trainable(levels[-1][1], True)
        output = base_model(model).get_output_embeddings()
        if head_is_tied(model):
            output.weight.requires_grad_(True)
            logger.warning(
                "The output layer is tied to the token embeddings: 'head only' trains that shared %s matrix "
                "(%s parameters), which changes the input embeddings too. keep_last_blocks=1 trains the top "
                "block instead.",
                "×".join(map(str, output.weight.shape)),
                f"{output.weight.numel():,}",
            )
    else:
        if embeddings:
            _set_trainable(levels[0][1], False)
        for _, parameters in levels[1 : 1 + lower_blocks]:
            _set_trainable(parameters, False)
    counts = count_parameters(model)
    logger.info("Trainable parameters: %s", counts)
    return counts


def set_dropout(model: torch.nn.Module, p: float) -> int:
    """Set every dropout probability of the model (modules, attention kernels' rates and the config); return
    how many places changed. LoRA's adapter dropout is a dropout module too, so it changes as well.

    >>> from gpt_helpers.models import build_model_from_config, tiny_gpt2_config
    >>> set_dropout(build_model_from_config(tiny_gpt2_config()), 0.2) > 0
    True
    """
    if not 0 <= p < 1:
        raise ConfigError(f"A dropout probability must be in [0, 1), not {p}. Typical values: 0.0 to 0.2.")
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
            changed += 1
        elif isinstance(getattr(module, "attention_dropout", None), float):  # rate passed to the attention kernel
            module.attention_dropout = p
            changed += 1
    config = base_model(model).config
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout"):
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, p)
    return changed


def from_scratch(model: torch.nn.Module, *, seed: int = 0) -> torch.nn.Module:
    """The same architecture with fresh random weights: the baseline for every transfer strategy.

    >>> from gpt_helpers.models import build_model_from_config, tiny_gpt2_config
    >>> model = build_model_from_config(tiny_gpt2_config())
    >>> type(from_scratch(model)) is type(model)
    True
    """
    base = base_model(model)
    dtype = next(base.parameters()).dtype
    return build_model_from_config(base.config, seed=seed, dtype=dtype)


# ------------------------------------------------------------------------------------------ learning rates
def discriminative_param_groups(
    model: torch.nn.Module, base_lr: float, *, decay: float = ULMFIT_DECAY, weight_decay: float = 0.01
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with ULMFiT's layer-wise learning rates, for ``train(param_groups=...)``.

    The top block (and the head) learn at ``base_lr``, each block below at the rate of the one above divided by
    ``decay``, the embeddings (with a tied output layer) slowest: ``base_lr / decay**L``. Weight decay applies to
    matrices only. Frozen parameters are included, so a later unfreeze trains them at their level's rate.

    >>> from gpt_helpers.models import build_model_from_config, tiny_gpt2_config
    >>> groups = discriminative_param_groups(build_model_from_config(tiny_gpt2_config(n_layer=2)), 1e-3)
    >>> {g["name"]: round(g["lr"], 6) for g in groups}
    {'embeddings': 0.000148, 'block 0': 0.000385, 'block 1': 0.001, 'head': 0.001}
    """
    if not 0 < base_lr < 1:
        raise ConfigError(f"base_lr must be between 0 and 1, not {base_lr}.")
    if decay < 1:
        raise ConfigError(f"decay must be at least 1 (1 = the same rate everywhere; ULMFiT used 2.6), not {decay}.")
    levels = model_levels(model)
    top_block = len(levels) - 2
    groups = []
    for index, (name, parameters) in enumerate(levels):
        lr = base_lr / decay ** (top_block - min(index, top_block))
        for wd, members in (
            (weight_decay, [p for p in parameters if p.ndim >= 2]),
            (0.0, [p for p in parameters if p.ndim < 2]),
        ):
            if members:
                groups.append({"params": members, "lr": lr, "weight_decay": wd, "name": name})
    return groups


class GradualUnfreezing:
    """A :func:`gpt_helpers.train` callback: start with only the top block (and the head) trainable, then unfreeze
    one more level from the top every ``every_steps`` steps, the embeddings last (ULMFiT, per steps not epochs).

    It works inside one run because ``train`` keeps frozen parameters in the optimizer. The step at which each
    level was unfrozen goes into ``history.info["gradual_unfreezing"]``; a resumed run restores the right stage.

    >>> from gpt_helpers.models import build_model_from_config, tiny_gpt2_config
    >>> schedule = GradualUnfreezing(build_model_from_config(tiny_gpt2_config(n_layer=3)), every_steps=10)
    >>> schedule.stages[0], schedule.stages[-1]
    (['head', 'block 2'], ['embeddings'])
    """

    def __init__(self, model: torch.nn.Module, every_steps: int):
        if not isinstance(every_steps, int) or every_steps < 1:
            raise ConfigError(f"every_steps must be a whole number of at least 1, not {every_steps!r}.")
        if _is_peft(model):
            raise ConfigError("Gradual unfreezing needs a plain model, not a LoRA (peft) model.")
        levels = dict(model_levels(model))
        names = list(levels)
        self.model = model
        self.every_steps = every_steps
        self.parameters = levels
        self.stages = [["head", names[-2]]] + [[name] for name in reversed(names[:-2])]
        self.unfrozen_at: dict[str, int] = {}
        self._apply(step=0)

    def stage_count(self, step: int) -> int:
        """How many stages are trainable after ``step`` steps."""
        return min(1 + step // self.every_steps, len(self.stages))

    def _apply(self, step: int) -> None:
        count = self.stage_count(step)
        _set_trainable(self.model.parameters(), False)
        for index, stage in enumerate(self.stages[:count]):
            for name in stage:
                _set_trainable(self.parameters[name], True)
                if name not in self.unfrozen_at:
                    self.unfrozen_at[name] = index * self.every_steps
                    if index:
                        logger.info("Step %d: unfroze %s (%s).", step, name, count_parameters(self.model))

    def on_train_begin(self, state) -> None:
        self._apply(state.step)

    def on_step_end(self, state) -> None:
        if state.step % self.every_steps == 0:
            self._apply(state.step)

    def on_train_end(self, state, history: History) -> None:
        history.info["gradual_unfreezing"] = {
            "every_steps": self.every_steps,
            "unfrozen_at_step": dict(self.unfrozen_at),
        }


# ------------------------------------------------------------------------------------------ LoRA
def apply_lora(
    model: torch.nn.Module,
    *,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    include_mlp: bool = False,
    seed: int = 0,
) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters (``peft``): the base is frozen, only the low-rank matrices train.

    Default targets are every attention projection of every block, found by
    :func:`~gpt_helpers.architecture.lora_target_modules`: GPT-2 ``c_attn`` and ``attn.c_proj``, Llama (SmolLM2)
    ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``. ``include_mlp=True`` adds the MLP's projections (GPT-2
    ``c_fc``, ``mlp.c_proj``; Llama ``gate_proj``, ``up_proj``, ``down_proj``); ``target_modules`` names them
    yourself. GPT-2's ``Conv1D`` layers store weights transposed: ``fan_in_fan_out`` is set for them.
    The adapters start as a no-op (B = 0): the wrapped model computes exactly what the base model did; A is drawn
    from ``seed`` (not from the process's random state), so the same call gives the same adapters in every
    process, and a resumed run can equal an uninterrupted one. ``dropout`` on the adapters' input is off by
    default, as in PEFT (it costs memory and time; the LoRA paper used 0.05-0.1 on small data).

    >>> from gpt_helpers.models import build_model_from_config, tiny_gpt2_config
    >>> lora = apply_lora(build_model_from_config(tiny_gpt2_config()), r=4)
    >>> count_parameters(lora).trainable
    1536
    """
    from peft import LoraConfig, get_peft_model

    if _is_peft(model):
        raise ConfigError(
            "This model already has LoRA adapters. Start again from the base model, or merge them with merge_lora()."
        )
    if not isinstance(r, int) or r < 1:
        raise ConfigError(f"The LoRA rank r must be a whole number of at least 1, not {r!r}. Typical values: 4 to 64.")
    if not 0 <= dropout < 1:
        raise ConfigError(f"The LoRA dropout must be in [0, 1), not {dropout}.")
    if target_modules is not None and include_mlp:
        raise ConfigError("Pass either target_modules or include_mlp=True, not both.")
    targets = list(target_modules) if target_modules else lora_target_modules(model, include_mlp=include_mlp)
    matched = [m for name, m in model.named_modules() if any(name == t or name.endswith("." + t) for t in targets)]
    if not matched:
        raise ConfigError(
            f"No module of {type(model).__name__} is named {targets}. Pick names from print(model) "
            f"(this model's attention projections: {lora_target_modules(model)})."
        )
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in matched),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lora_model = get_peft_model(model, config)
    logger.info("LoRA r=%d on %s: %s", r, ", ".join(targets), count_parameters(lora_model))
    return lora_model


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold the adapters into the base weights and return the plain model (same outputs, no peft needed).

    The merge happens in place: the LoRA model now computes with merged weights and has no adapters left to train.
    """
    if not _is_peft(model):
        raise ConfigError("merge_lora needs a LoRA model (from apply_lora); this one has no adapters.")
    return model.merge_and_unload()


def save_merged(model: torch.nn.Module, tokenizer, folder: str | Path) -> Path:
    """Merge LoRA adapters (if any) and save a plain model folder that ``load_model`` / ``AutoModelForCausalLM`` load.

    >>> from gpt_helpers.models import load_model
    >>> model, tok = load_model()
    >>> save_merged(apply_lora(model), tok, "/tmp/merged-doctest").name
    'merged-doctest'
    """
    plain = merge_lora(model) if _is_peft(model) else model
    return checkpoints.save_model_folder(Path(folder), plain, tokenizer)


# ------------------------------------------------------------------------------------------ by name
def prepare_strategy(
    strategy: str,
    model: torch.nn.Module,
    *,
    learning_rate: float,
    max_steps: int | None,
    weight_decay: float = 0.01,
    lora: dict[str, Any] | None = None,
    unfreeze_every: int | None = None,
) -> tuple[torch.nn.Module, list[dict[str, Any]] | None, list]:
    """Apply a strategy by its name to a freshly loaded model: ``(model, param_groups, callbacks)`` for ``train``.

    ``full``; ``head_only`` (output layer and final norm); ``frozen_body`` (top block); ``top_quarter`` (the top
    quarter of the blocks); ``freeze_lower_half``; ``discriminative`` (ULMFiT's layer-wise rates);
    ``gradual_unfreezing`` (one more level every ``unfreeze_every`` steps, by default spread over ``max_steps``);
    ``lora`` (adapters on the attention projections) and ``lora_mlp`` (attention and MLP), with ``lora`` options
    for :func:`apply_lora`; ``from_scratch`` (the caller loads the model randomly initialised).
    """
    n_blocks = len(transformer_blocks(model))
    param_groups, callbacks = None, []
    if strategy == "head_only":
        freeze(model, all_but_head=True)
    elif strategy == "frozen_body":
        freeze(model, keep_last_blocks=1)
    elif strategy == "top_quarter":
        freeze(model, keep_last_blocks=max(1, n_blocks // 4))
    elif strategy == "freeze_lower_half":
        freeze(model, embeddings=True, lower_blocks=n_blocks // 2)
    elif strategy == "discriminative":
        param_groups = discriminative_param_groups(model, learning_rate, weight_decay=weight_decay)
    elif strategy == "gradual_unfreezing":
        if unfreeze_every is None and not max_steps:
            raise ConfigError("gradual_unfreezing with a time budget needs unfreeze_every=<steps>.")
        callbacks = [GradualUnfreezing(model, unfreeze_every or max(1, max_steps // (n_blocks + 1)))]
    elif strategy in ("lora", "lora_mlp"):
        model = apply_lora(model, include_mlp=strategy == "lora_mlp", **(lora or {}))
    elif strategy not in ("full", "from_scratch"):
        raise ConfigError(f"Unknown strategy {strategy!r}: choose from {', '.join(STRATEGIES)}.")
    return model, param_groups, callbacks
