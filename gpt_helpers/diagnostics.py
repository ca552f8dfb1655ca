"""Read a training history and say what went wrong, since when, and what to try next.

``diagnose(history)`` looks for, in order of urgency:

* **divergence** — a non-finite loss (NaN/inf), skipped non-finite steps, or a loss that shot up;
* **overfitting** — validation loss turning up while training loss keeps falling (with the step it began);
* **underfitting** — training and validation loss barely moved during the whole run (a short run whose loss is
  still falling is "too short to judge", not underfitting);
* **plateau** — the loss improved, then stopped improving for the last part of the run (not when a decayed
  schedule simply ended while the validation loss was still at its best);
* **noisy loss** — step-to-step swings large compared with the trend;

and says **healthy** when it sees none of them. Divergence is reported alone (nothing else means much then), a
plateau only when there is no over- or underfitting, and noise alongside any finding. Each finding carries the evidence (numbers from the history)
and advice with concrete values computed from the run's own settings (``history.info["config"]``).
Losses are compared after a running median, so one unlucky batch does not trigger a finding.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .evaluation import PERPLEXITY_CAP_LOSS
from .history import History

#: Loss changes below this (nats) are treated as no change.
MIN_CHANGE = 0.02
#: A run counts as "barely improving" when its smoothed loss fell by less than this fraction.
UNDERFIT_FRACTION = 0.03
#: A short run still learning is "too short to judge" if this many times its steps, at its pace, would clear
#: UNDERFIT_FRACTION; slower than that (a learning rate far too low) it is underfitting, however steady the fall.
LONGER = 4
#: A plateau: the last part of the run improved at less than this fraction of the earlier rate.
PLATEAU_RATE = 0.1
#: Noise (robust standard deviation around the trend, nats) above which a loss curve is called noisy …
NOISE_NATS = 0.1
#: … when it is also at least this fraction of the loss level.
NOISE_FRACTION = 0.02


@dataclass(frozen=True)
class Diagnosis:
    """One finding: what (``problem``), how bad (``severity``: ``"error"``, ``"warning"`` or ``"info"``), from which
    step, the numbers (``evidence``), and what to try (``advice``)."""

    problem: str
    severity: str
    step: int | None
    evidence: str
    advice: str

    def __str__(self) -> str:
        where = f" (from step {self.step})" if self.step is not None else ""
        return f"[{self.severity}] {self.problem}{where}: {self.evidence}\n  → {self.advice}"


# ------------------------------------------------------------------------------------------ series helpers
def _series(history: History, column: str) -> tuple[list[int], list[float]]:
    steps, values = history.column(column)
    return list(steps), [float(v) for v in values]


def running_median(values: Sequence[float], window: int) -> list[float]:
    """Centred running median (the window shrinks at the ends).

    >>> running_median([1, 9, 2, 3, 4], 3)
    [5.0, 2, 3, 3, 3.5]
    """
    half = window // 2
    return [statistics.median(values[max(0, i - half) : i + half + 1]) for i in range(len(values))]


def _smooth(values: Sequence[float]) -> list[float]:
    return running_median(values, min(51, max(3, len(values) // 8 * 2 + 1))) if len(values) >= 3 else list(values)


def _noise(values: Sequence[float]) -> float:
    """Robust standard deviation of the values around their running-median trend (MAD × 1.4826)."""
    if len(values) < 8:
        return 0.0
    trend = running_median(values, 5)
    return 1.4826 * statistics.median(abs(v - t) for v, t in zip(values, trend))


def _setting(history: History, name: str, default: Any) -> Any:
    value = history.info.get("config", {}).get(name)
    return default if value is None else value


# ------------------------------------------------------------------------------------------ the checks
def _divergence(history: History, vocab_size: int | None) -> Diagnosis | None:
    lr = _setting(history, "learning_rate", 5e-4)
    advice = (
        f"Lower the learning rate about 10× (learning_rate={lr / 10:.1e} instead of {lr:.1e}), keep gradient "
        f"clipping on (max_grad_norm=1.0), warm up over ~5% of the steps (warmup_steps="
        f"{max(10, int(0.05 * _setting(history, 'max_steps', 200)))}); with fp16 switch to bf16 or fp32."
    )
    bad = [
        r.step
        for r in history.records
        if any(v is not None and not math.isfinite(v) for v in (r.train_loss, r.eval_loss))
    ]
    skipped = history.info.get("skipped_nonfinite_steps") or 0
    if bad or skipped:
        evidence = (f"the loss became NaN/inf at step {bad[0]}" if bad else "no logged loss is NaN") + (
            f"; {skipped} optimizer steps were skipped because their loss was not finite" if skipped else ""
        )
        return Diagnosis("divergence", "error", bad[0] if bad else None, evidence, advice)
    steps, losses = _series(history, "train_loss")
    bound = math.log(vocab_size) + 1 if vocab_size else math.inf
    above = [i for i, loss in enumerate(losses) if loss > bound]
    if above:
        return Diagnosis(
            "divergence",
            "error",
            steps[above[0]],
            f"the training loss reached {losses[above[0]]:.2f} at step {steps[above[0]]}, worse than guessing "
            f"uniformly among {vocab_size:,} tokens (ln {vocab_size:,} = {math.log(vocab_size):.2f})",
            advice,
        )
    lowest = losses[0] if losses else math.inf  # the best level so far, as a running median of 3
    for i in range(1, len(losses)):
        after = statistics.median(losses[i : i + 3])  # the level it jumped to, and stayed at
        if after - lowest > max(0.5, 0.2 * lowest):
            return Diagnosis(
                "divergence",
                "error",
                steps[i],
                f"the training loss jumped from {lowest:.2f} to {after:.2f} at step {steps[i]} and stayed there",
                advice,
            )
        lowest = min(lowest, statistics.median(losses[max(0, i - 2) : i + 1]))
    capped = [r.step for r in history.eval_records if r.eval_loss >= PERPLEXITY_CAP_LOSS]
    if capped:
        return Diagnosis(
            "divergence",
            "error",
            capped[0],
            f"the validation loss reached {max(r.eval_loss for r in history.eval_records):.1f} nats per token at step "
            f"{capped[0]}: its perplexity is beyond 10^12 and shows only as the cap, exp({PERPLEXITY_CAP_LOSS}) ≈ "
            f"{math.exp(PERPLEXITY_CAP_LOSS):.2e} (the model puts almost no probability on the right tokens)",
            advice,
        )
    return None


def _overfitting(history: History) -> Diagnosis | None:
    evals = history.eval_records
    if len(evals) < 3:
        return None
    best_index = min(range(len(evals)), key=lambda i: evals[i].eval_loss)
    best, last = evals[best_index], evals[-1]
    rise = last.eval_loss - best.eval_loss
    rising_evals = len(evals) - 1 - best_index
    if rise < max(MIN_CHANGE, 0.01 * best.eval_loss) or rising_evals < 2:
        return None
    steps, losses = _series(history, "train_loss")
    if not losses:
        return None
    smooth = _smooth(losses)
    at_best = next((v for s, v in zip(steps, smooth) if s >= best.step), smooth[-1])
    if smooth[-1] > at_best - MIN_CHANGE:
        return None  # validation rose but training did not improve either: not overfitting
    config = history.info.get("config", {})
    wd, lr = config.get("weight_decay", 0.01), config.get("learning_rate", 5e-4)
    dropout = history.info.get("dropout")
    regularise = ["more training data"]
    regularise.append(
        f"weight_decay=0.1 (now {wd:g})" if wd < 0.1 else f"(weight decay is already {wd:g}; more rarely helps)"
    )
    if dropout is None or dropout < 0.1:
        regularise.append(f"dropout 0.1 (now {dropout if dropout is not None else 'unknown'}; strategies.set_dropout)")
    else:
        regularise.append(f"(dropout is already {dropout:g})")
    evidence = (
        f"validation loss was lowest at step {best.step} ({best.eval_loss:.3f}) and rose to {last.eval_loss:.3f} "
        f"by step {last.step}, while training loss fell from {at_best:.3f} to {smooth[-1]:.3f}"
    )
    advice = (
        f"Keep the model from step {best.step} (the 'best' folder) and stop there: early_stopping_patience=2 or "
        f"max_steps≈{best.step}. Then regularise: {', '.join(regularise)}, learning_rate={lr / 3:.1e} (now {lr:.1e}), "
        "or train fewer parameters (freeze the lower blocks, or LoRA)."
    )
    severity = "warning" if rise < 0.1 * best.eval_loss else "error"
    return Diagnosis("overfitting", severity, best.step, evidence, advice)


def _improvement(values: Sequence[float]) -> float:
    """How much the smoothed values fell, as a fraction of where they started (negative: they rose)."""
    smooth = _smooth(values)
    return (smooth[0] - smooth[-1]) / abs(smooth[0]) if smooth[0] else 0.0


def _still_falling(values: Sequence[float]) -> bool:
    """Whether the second half of the values is clearly lower than the first: a trend, not noise."""
    if len(values) < 4:
        return False
    half = len(values) // 2
    first, second = statistics.median(values[:half]), statistics.median(values[half:])
    return first - second > max(MIN_CHANGE / 2, 2 * _noise(values) / math.sqrt(half))


def _change(start: float, end: float) -> str:
    return (
        f"fell by {100 * (start - end) / start:.1f}%" if end < start else f"rose by {100 * (end - start) / start:.1f}%"
    )


def _underfitting(history: History) -> Diagnosis | None:
    steps, losses = _series(history, "train_loss")
    eval_losses = [r.eval_loss for r in history.eval_records]
    if len(losses) < 3:
        return None
    train_gain = _improvement(losses)
    eval_gain = _improvement(eval_losses) if len(eval_losses) >= 2 else train_gain
    if max(train_gain, eval_gain) >= UNDERFIT_FRACTION:
        return None
    falling = _still_falling(losses) and (len(eval_losses) < 2 or eval_losses[-1] < eval_losses[0])
    smooth = _smooth(losses)
    if falling and LONGER * train_gain >= UNDERFIT_FRACTION:  # learning, just stopped early: too early to judge
        return Diagnosis(
            "too short to judge",
            "info",
            None,
            f"over {steps[-1]} steps the smoothed training loss {_change(smooth[0], smooth[-1])} "
            f"({smooth[0]:.3f} → {smooth[-1]:.3f}) and is still going down"
            + (f"; validation {eval_losses[0]:.3f} → {eval_losses[-1]:.3f}" if len(eval_losses) >= 2 else ""),
            f"The settings look fine; the run is just short. Train longer (max_steps={LONGER * steps[-1]}) before judging.",
        )
    lr = _setting(history, "learning_rate", 5e-4)
    trainable = history.info.get("trainable_parameters")
    total = history.info.get("parameters")
    share = (
        f" Only {100 * trainable / total:.1f}% of the parameters train: unfreeze more blocks or use a larger LoRA rank."
        if trainable and total and trainable < 0.2 * total
        else ""
    )
    evidence = (
        f"over {steps[-1]} steps the smoothed training loss {_change(smooth[0], smooth[-1])} "
        f"({smooth[0]:.3f} → {smooth[-1]:.3f}; logged {losses[0]:.3f} → {losses[-1]:.3f})"
        + (f", validation {eval_losses[0]:.3f} → {eval_losses[-1]:.3f}" if eval_losses else "")
    )
    advice = (
        f"The model is hardly learning. Raise the learning rate 10× (learning_rate={min(lr * 10, 0.5):.1e} instead of "
        f"{lr:.1e}); fine-tuning usually works between 1e-5 and 1e-3, from scratch up to 3e-3. Train longer "
        f"(max_steps={2 * steps[-1]}), check that warmup_steps ({_setting(history, 'warmup_steps', 0)}) is a small "
        f"part of the run.{share}"
    )
    return Diagnosis("underfitting", "warning", steps[0], evidence, advice)


def _plateau(history: History) -> Diagnosis | None:
    steps, losses = _series(history, "train_loss")
    if len(losses) < 8:
        return None
    smooth = _smooth(losses)
    cut = int(0.6 * len(smooth))
    early_rate = (smooth[0] - smooth[cut]) / max(steps[cut] - steps[0], 1)
    late_rate = (smooth[cut] - smooth[-1]) / max(steps[-1] - steps[cut], 1)
    if early_rate <= 0 or late_rate > PLATEAU_RATE * early_rate:
        return None
    final = smooth[-1]
    since = next(s for s, v in zip(steps, smooth) if v - final < max(MIN_CHANGE, 0.1 * (smooth[0] - final)))
    _, rates = _series(history, "learning_rate")
    annealed = rates and rates[-1] < 0.3 * max(rates)
    evals = history.eval_records
    if annealed and len(evals) >= 2 and history.best is evals[-1]:
        return None  # the schedule ran its course and validation was still at its best at the end: not a plateau
    evidence = (
        f"the training loss fell {smooth[0] - smooth[cut]:.2f} in the first {steps[cut]} steps, then changed by "
        f"{final - smooth[cut]:+.2f} in the last {steps[-1] - steps[cut]} (now {final:.3f}); it has been within "
        f"{max(MIN_CHANGE, 0.1 * (smooth[0] - final)):.2f} of that since step {since}"
    )
    if annealed:
        advice = (
            f"The schedule has already lowered the learning rate, so this is as far as this setup goes: stop near "
            f"step {since} to save {100 * (1 - since / steps[-1]):.0f}% of the time, or give the model more to work "
            "with: more data, more trainable parameters (unfreeze blocks, larger LoRA rank), a larger model."
        )
    else:
        lr = _setting(history, "learning_rate", 5e-4)
        advice = (
            f"The learning rate is still high at the end ({rates[-1] if rates else lr:.1e}): decay it "
            f"(lr_schedule='cosine', min_lr_ratio=0.1) or lower it 3× (learning_rate={lr / 3:.1e}) to settle lower; "
            "beyond that, more data or more trainable parameters."
        )
    return Diagnosis("plateau", "info", since, evidence, advice)


def _noisy(history: History) -> Diagnosis | None:
    _, losses = _series(history, "train_loss")
    noise = _noise(losses)
    level = statistics.median(losses) if losses else 0.0
    if noise < NOISE_NATS or noise < NOISE_FRACTION * level:
        return None
    batch = _setting(history, "batch_size", 16)
    accumulation = _setting(history, "gradient_accumulation_steps", 1)
    lr = _setting(history, "learning_rate", 5e-4)
    evidence = (
        f"the training loss swings by ±{noise:.2f} around its trend (median level {level:.2f}) with "
        f"{batch * accumulation} examples per step"
    )
    advice = (
        f"Average over more examples per step: gradient_accumulation_steps={4 * accumulation} (or batch_size={4 * batch} "
        f"if memory allows), and/or lower the learning rate (learning_rate={lr / 2:.1e}). Judge progress by the "
        "validation loss, which is averaged over many batches."
    )
    return Diagnosis("noisy loss", "info", None, evidence, advice)


def diagnose(history: History, *, vocab_size: int | None = None) -> list[Diagnosis]:
    """Name what a training history shows, most urgent first; ``[Diagnosis("healthy", …)]`` when nothing is wrong.

    ``vocab_size`` (``len(tokenizer)``) also flags a loss above ln(vocab_size) + 1 — worse than guessing uniformly —
    which catches a run that blew up before its first logged step.

    >>> from gpt_helpers.history import History
    >>> history = History()
    >>> for step, loss in enumerate([5.0, 4.0, 3.2, 2.7, 2.4, 2.2], start=1):
    ...     _ = history.log(step=step, epoch=0, tokens_seen=step * 100, learning_rate=1e-3, train_loss=loss)
    >>> [d.problem for d in diagnose(history)]
    ['healthy']
    """
    if not history.records:
        return [
            Diagnosis(
                "no data",
                "warning",
                None,
                "the history has no logged steps",
                "Train for at least a few log intervals (log_every) before diagnosing.",
            )
        ]
    divergence = _divergence(history, vocab_size)
    if divergence:
        return [divergence]
    findings = [check(history) for check in (_overfitting, _underfitting)]
    findings = [f for f in findings if f]
    if not findings:
        findings = [f for f in (_plateau(history),) if f]
    findings += [f for f in (_noisy(history),) if f]
    if findings:
        return findings
    steps, losses = _series(history, "train_loss")
    best = history.best
    evidence = (
        f"training loss {losses[0]:.3f} → {losses[-1]:.3f} over {steps[-1]} steps"
        if losses
        else "no training loss logged"
    ) + (f"; best validation loss {best.eval_loss:.3f} at step {best.step}" if best else "")
    still = losses and best and best.step == history.eval_records[-1].step
    advice = (
        "Still improving at the end: more steps would likely lower the loss further."
        if still
        else "Nothing to fix: keep this setup."
    )
    return [Diagnosis("healthy", "info", None, evidence, advice)]


def format_diagnosis(diagnoses: Diagnosis | Sequence[Diagnosis]) -> str:
    """One block of text per finding, for printing in a notebook or a terminal.

    >>> print(format_diagnosis(Diagnosis("plateau", "info", 120, "loss flat", "stop earlier")))
    [info] plateau (from step 120): loss flat
      → stop earlier
    """
    items = [diagnoses] if isinstance(diagnoses, Diagnosis) else list(diagnoses)
    return "\n".join(str(item) for item in items)
