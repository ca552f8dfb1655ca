"""``TrainingPanel``: change the hyperparameters of a fine-tuning run with controls, press Run, watch it train.

    from gpt_helpers.widgets import TrainingPanel
    panel = TrainingPanel(model_name="tiny-gpt2-base", dataset="drug_reviews",
                          config=TrainingConfig(max_steps=60, batch_size=8, output_dir="runs/04_panel"))
    panel                      # shows the controls; press "Run"
    panel.config               # the TrainingConfig the last run used
    panel.history              # its History (also panel.histories: every run of this panel, by label)

Every run starts again from the *pre-trained* weights (a fresh copy of the model loaded once), so runs
differ only by the settings you changed and can be compared on one plot: ``plot_history(panel.histories)``.

Thread safety (why the panel is built the way it is)
-----------------------------------------------------
Training runs in a background thread so that the kernel's main thread stays free to receive button clicks
(Stop must work while training runs). The rules that keep this safe:

* The worker never *reads* a widget. The settings are read once, in the thread that pressed Run, into a
  validated :class:`~gpt_helpers.config.TrainingConfig`; the controls are disabled until the run ends, so what
  they show is what is used.
* The worker only *assigns* widget traits (a progress value, an HTML string, an Output's ``outputs``). Each
  assignment is one comm message, sent through ipykernel's IOPub channel, which is thread-safe. It never uses
  ``with output:`` (that captures by message id and goes astray from a thread), never ``print``s, and never
  touches pyplot (not thread-safe): the plot is a PNG rendered from a stand-alone matplotlib ``Figure``.
* transformers' own progress bars (saving a model) are switched off while a panel run lasts.
* Log records from the worker thread (``gpt_helpers``, ``accelerate``) are diverted into the panel's log box by
  a filter keyed on the thread id, so they cannot land in whichever cell happens to be running.
* Stop sets a ``threading.Event``; a training callback checks it after each optimizer step and sets
  ``state.stop_requested``, the loop's own clean exit (final evaluation, model and history saved). The model
  and optimizer are only ever used by the worker.
* One run at a time: Run is disabled while a run is active, and :meth:`TrainingPanel.run` refuses a second.
  A kernel interrupt does not reach the worker thread: use Stop.

``ipywidgets`` is imported only when a panel is made, with a clear error if it is missing.
"""

from __future__ import annotations

import base64
import copy
import html
import io
import logging
import math
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from .config import TrainingConfig
from .errors import ConfigError, GPTHelpersError

logger = logging.getLogger(__name__)

#: Learning rates offered by the log slider (10^LR_EXPONENTS).
LR_EXPONENTS = (-5.0, -2.0)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024)
#: Ranges of the typed (integer) controls: (lowest, highest).
RANGES = {"max_steps": (1, 100_000), "warmup_steps": (0, 10_000), "eval_every": (1, 100_000), "seed": (0, 2**31 - 1)}


def _require_ipywidgets():
    try:
        import ipywidgets
    except ImportError:
        raise GPTHelpersError(
            "The training panel needs ipywidgets: pip install ipywidgets (Colab has it already), then restart the "
            "kernel. Without it, call gpt_helpers.train(...) directly with a TrainingConfig."
        ) from None
    return ipywidgets


def round_learning_rate(value: float) -> float:
    """The slider's value with two significant digits (10^-3.3 → 5.0e-4), the number that is used and shown.

    >>> round_learning_rate(0.000501187)
    0.0005
    """
    return float(f"{value:.2g}")


def _transformers_bars(on: bool) -> bool:
    """Turn transformers' own progress bars ("Writing model shards") on or off; returns whether they were on.

    They write to stderr, which from the worker thread would land in whatever cell runs; the switch is
    process-wide, so it is off only while a panel run lasts.
    """
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return False
    was_on = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if on else hf_logging.disable_progress_bar)()
    return was_on


class _StopCallback:
    """Training callback: relays the panel's Stop button, progress and live curves (runs in the worker thread)."""

    def __init__(self, panel: "TrainingPanel"):
        self.panel = panel

    def on_train_begin(self, state) -> None:
        self.panel._progress_update(state.step)

    def on_step_end(self, state) -> None:
        if self.panel._stop_event.is_set() and not state.stop_requested:
            state.stop_requested = True
            state.stop_reason = f"stopped from the panel after step {state.step}"
        self.panel._progress_update(state.step)

    def on_log(self, state, history) -> None:
        self.panel._on_log(state, history)

    def on_train_end(self, state, history) -> None:
        self.panel._on_log(state, history, final=True)


class _ThreadLogFilter(logging.Filter):
    """Keeps the worker thread's log records out of the notebook's handlers and in the panel's log box."""

    def __init__(self, thread_id: int, sink: deque):
        super().__init__()
        self.thread_id, self.sink = thread_id, sink

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread_id:
            return True
        try:
            self.sink.append(f"{record.levelname.lower()}: {record.getMessage()}")
        except Exception:  # noqa: BLE001 - a malformed log call must not break training
            pass
        return False


class TrainingPanel:
    """Controls for a fine-tuning run, a Run and a Stop button, a progress bar, live curves and a summary.

    Parameters
    ----------
    model_name:
        A bundled short name, a local folder or a hub name, loaded once with :func:`~gpt_helpers.load_model`
        (or pass ``model=`` and ``tokenizer=`` already loaded). Each run trains a fresh copy.
    dataset:
        A course dataset name (``"drug_reviews"``…: its train and validation splits are used), or a dict
        ``{"train": [texts], "validation": [texts]}``.
    config:
        The starting values; fields without a control (output folder, eval batches, schedule…) are taken from
        it as they are. ``progress`` is always off (the panel has its own bar). Each run writes to
        ``<config.output_dir>/run-NN``.
    block_size:
        The starting tokens per example (the nearest size the model's context allows).
    prompt:
        Optional text to continue with the trained model after each run (shown in the summary).
    callbacks:
        Extra training callbacks added to every run.
    """

    def __init__(self, model_name: str | None = None, dataset: str | dict[str, list[str]] = "drug_reviews",
                 config: TrainingConfig | None = None, *, block_size: int = 128, model=None, tokenizer=None,
                 prompt: str | None = None,
                 max_new_tokens: int = 30, callbacks: list | tuple = (), plot_interval_seconds: float = 0.5):
        widgets = _require_ipywidgets()
        from .models import DEFAULT_MODEL, load_model

        self.base_config = config or TrainingConfig(max_steps=60, batch_size=8, eval_every=20, log_every=5,
                                                    output_dir="runs/panel")
        if not isinstance(self.base_config, TrainingConfig):
            raise ConfigError(f"config must be a TrainingConfig, not {type(self.base_config).__name__}.")
        if model is None:
            self.model_name = model_name or DEFAULT_MODEL
            model, tokenizer = load_model(self.model_name)
        else:
            if tokenizer is None:
                raise ConfigError("Pass tokenizer= together with model=.")
            self.model_name = model_name or getattr(model, "name_or_path", "model")
        self._pretrained, self.tokenizer = model, tokenizer
        self._texts = self._load_texts(dataset)
        self.dataset_name = dataset if isinstance(dataset, str) else "custom texts"
        self._prepared: dict[int, tuple[Any, Any]] = {}
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self._block_size_default = block_size
        self.extra_callbacks = list(callbacks)
        self.plot_interval_seconds = plot_interval_seconds

        self.config: TrainingConfig = self.base_config  # the config of the last run (the starting one before any)
        self.last_result = None
        self.last_error: str | None = None
        self.histories: dict[str, Any] = {}
        self.runs = 0
        self.log_lines: deque = deque(maxlen=200)
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._running = False
        self._last_plot = 0.0
        self._build(widgets)

    # ----------------------------------------------------------------------------------------------- set-up
    @staticmethod
    def _load_texts(dataset) -> dict[str, list[str]]:
        from .data import load_course_dataset

        if isinstance(dataset, str):
            return {"train": load_course_dataset(dataset, "train"), "validation": load_course_dataset(dataset, "validation")}
        if isinstance(dataset, dict) and "train" in dataset:
            return {"train": list(dataset["train"]), "validation": list(dataset.get("validation") or [])}
        raise ConfigError("dataset must be a course dataset name or a dict {'train': [texts], 'validation': [texts]}.")

    def _context_length(self) -> int | None:
        from .models import model_context_length

        return model_context_length(self._pretrained)

    def _build(self, w) -> None:
        c = self.base_config
        style = {"description_width": "120px"}
        layout = w.Layout(width="420px")

        def hint(text: str):
            return w.HTML(f"<span style='color:#666;font-size:90%'>{html.escape(text)}</span>")

        lr_exponent = min(max(math.log10(c.learning_rate), LR_EXPONENTS[0]), LR_EXPONENTS[1])
        context = self._context_length() or max(BLOCK_SIZES)
        blocks = [b for b in BLOCK_SIZES if b <= context]
        block_default = min(blocks, key=lambda b: abs(b - self._block_size_default))
        self.controls: dict[str, Any] = {
            "learning_rate": w.FloatLogSlider(value=10 ** lr_exponent, base=10, min=LR_EXPONENTS[0], max=LR_EXPONENTS[1],
                                              step=0.1, readout_format=".1e", description="learning rate",
                                              style=style, layout=layout, continuous_update=False),
            "max_steps": w.IntText(value=c.max_steps or 100, description="steps", style=style, layout=layout),
            "batch_size": w.Dropdown(options=list(dict.fromkeys(sorted((*BATCH_SIZES, c.batch_size))))
                                     , value=c.batch_size, description="batch size", style=style, layout=layout),
            "block_size": w.Dropdown(options=blocks, value=block_default, description="block size", style=style, layout=layout),
            "warmup_steps": w.IntText(value=c.warmup_steps, description="warmup", style=style, layout=layout),
            "weight_decay": w.FloatSlider(value=min(c.weight_decay, 0.3), min=0.0, max=0.3, step=0.01, readout_format=".2f",
                                          description="weight decay", style=style, layout=layout, continuous_update=False),
            "eval_every": w.IntText(value=c.eval_every, description="eval every", style=style, layout=layout),
            "seed": w.IntText(value=c.seed, description="seed", style=style, layout=layout),
        }
        hints = {
            "learning_rate": "peak AdamW step size, log scale 1e-5 … 1e-2 (fine-tuning: 1e-4 … 1e-3)",
            "max_steps": f"optimizer steps, {RANGES['max_steps'][0]} … {RANGES['max_steps'][1]:,}",
            "batch_size": "examples (blocks) per optimizer step",
            "block_size": f"tokens per example, at most the model's context ({context})",
            "warmup_steps": "steps of linear learning-rate warmup, 0 … steps",
            "weight_decay": "AdamW decoupled decay per step × lr, 0 = off",
            "eval_every": "steps between validation measurements",
            "seed": "random seed (data order, dropout), 0 … 2³¹−1",
        }
        for name, control in self.controls.items():
            control.add_class(f"gh-{name.replace('_', '-')}")
        self.controls["learning_rate"].add_class("gh-lr")
        self.controls["max_steps"].add_class("gh-steps")
        rows = [w.HBox([control, hint(hints[name])]) for name, control in self.controls.items()]

        self.run_button = w.Button(description="Run", button_style="success", icon="play", tooltip="Start a run with these settings")
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop", disabled=True,
                                    tooltip="End the run after the current step (the history is kept)")
        self.run_button.add_class("gh-run")
        self.stop_button.add_class("gh-stop")
        self.run_button.on_click(lambda _: self.run(block=False))
        self.stop_button.on_click(lambda _: self.stop())
        self.progress = w.IntProgress(value=0, min=0, max=max(c.max_steps or 1, 1), description="progress",
                                      bar_style="info", style=style, layout=w.Layout(width="420px"))
        self.progress.add_class("gh-progress")
        self.progress_label = w.HTML("")
        self.progress_label.add_class("gh-progress-label")
        self.status = w.HTML(self._status_html("Ready. Change the settings and press Run.", "info"))
        self.status.add_class("gh-status")
        self.plot = w.Output(layout=w.Layout(min_height="40px"))
        self.plot.add_class("gh-plot")
        self.summary = w.HTML("")
        self.summary.add_class("gh-summary")
        self.log_box = w.HTML("")
        self.log_box.add_class("gh-log")
        title = w.HTML(f"<b>Fine-tuning panel</b> — model <code>{html.escape(str(self.model_name))}</code>, "
                       f"data <code>{html.escape(self.dataset_name)}</code>")
        self.widget = w.VBox([title, *rows, w.HBox([self.run_button, self.stop_button]),
                              w.HBox([self.progress, self.progress_label]), self.status, self.plot, self.summary,
                              self.log_box])
        self.widget.add_class("gh-panel")

    def _repr_mimebundle_(self, **kwargs):
        """The widget in a live notebook; a readable placeholder where widgets cannot run (saved outputs, CI)."""
        bundle = self.widget._repr_mimebundle_(**kwargs) or {}
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        data["text/plain"] = (f"TrainingPanel for {self.model_name} on {self.dataset_name}: an interactive widget. "
                              "Run the notebook in Jupyter to use it.")
        return bundle

    def __repr__(self) -> str:
        return f"TrainingPanel(model_name={self.model_name!r}, dataset={self.dataset_name!r}, runs={self.runs})"

    # ----------------------------------------------------------------------------------------------- settings
    def set(self, **values: Any) -> "TrainingPanel":
        """Set controls by TrainingConfig field name, as a learner would: ``panel.set(learning_rate=1e-3, max_steps=30)``."""
        unknown = set(values) - set(self.controls)
        if unknown:
            raise ConfigError(f"The panel has no control for {', '.join(sorted(unknown))}; controls: {', '.join(self.controls)}.")
        for name, value in values.items():
            control = self.controls[name]
            if name == "learning_rate":
                if not value > 0:
                    raise ConfigError(f"learning rate must be positive, not {value}.")
                exponent = math.log10(value)
                if not LR_EXPONENTS[0] <= exponent <= LR_EXPONENTS[1]:
                    raise ConfigError(f"learning rate must be between 1e-05 and 1e-02 on this panel, not {value:g}.")
            if hasattr(control, "options") and value not in control.options:
                raise ConfigError(f"{control.description} must be one of {list(control.options)}, not {value!r}.")
            control.value = value
        return self

    def current_config(self, output_dir: str | None = None) -> TrainingConfig:
        """The validated TrainingConfig the controls describe now (``ConfigError`` with the reason otherwise)."""
        values = {name: control.value for name, control in self.controls.items() if name != "block_size"}
        values["learning_rate"] = round_learning_rate(values["learning_rate"])
        for name, (low, high) in RANGES.items():
            value = values[name]
            label = self.controls[name].description
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{label} must be a whole number from {low:,} to {high:,}, not {value!r}.")
        values["weight_decay"] = round(float(values["weight_decay"]), 4)
        return self.base_config.replace(**values, progress=False, output_dir=output_dir or self.base_config.output_dir)

    @property
    def block_size(self) -> int:
        """The block size (tokens per example) of the controls; it shapes the data, not the TrainingConfig."""
        return int(self.controls["block_size"].value)

    @property
    def history(self):
        """The History of the last run (``None`` before any)."""
        return self.last_result.history if self.last_result is not None else None

    @property
    def running(self) -> bool:
        return self._running

    # ----------------------------------------------------------------------------------------------- actions
    def run(self, *, block: bool = True):
        """Start a run with the controls' values, as the Run button does.

        ``block=True`` (for tests and scripts) trains in the calling thread and returns the
        :class:`~gpt_helpers.training.TrainResult`, or ``None`` when the settings were refused or training
        failed (the reason is in :attr:`last_error` and in the panel). The button uses ``block=False``:
        a background thread, so Stop stays live.
        """
        with self._lock:
            if self._running:
                self._show_status("A run is already in progress: press Stop first.", "warning")
                return None
            self.last_error = None
            try:
                self.runs += 1
                label = f"run-{self.runs:02d}"
                config = self.current_config(str(Path(self.base_config.output_dir) / label))
            except GPTHelpersError as error:
                self.runs -= 1
                # Nothing ran: only the status changes; the bar, plot and summary still show the last run.
                self.last_error = f"Cannot start: {error}"
                self._show_status(self.last_error, "error")
                return None
            self._running = True
            self._stop_event.clear()
            self.config = config
            self._set_busy(True)
            self.summary.value = ""
            self.log_lines.clear()
            self.log_box.value = ""
            self.progress.max = config.max_steps
            self.progress.value = 0
            self.progress.bar_style = "info"
            self._show_status(f"Starting {label}: preparing data and a fresh copy of the model…", "info")
        if block:
            self._work(label, config, self.block_size)
            return self.last_result if self.last_error is None else None
        self._thread = threading.Thread(target=self._work, args=(label, config, self.block_size), name=f"panel-{label}",
                                        daemon=True)
        self._thread.start()
        return None

    def stop(self) -> None:
        """Ask the running training to end after its current step (the Stop button)."""
        if self._running:
            self._stop_event.set()
            self.stop_button.disabled = True
            self._show_status("Stopping after the current step…", "warning")

    def wait(self, timeout: float | None = None):
        """Wait for a background run to end; returns :attr:`last_result`."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.last_result

    # ----------------------------------------------------------------------------------------------- the worker
    def _work(self, label: str, config: TrainingConfig, block_size: int) -> None:
        """One run, start to end; every failure is shown in the panel and kept in ``last_error``, never raised."""
        from .training import train

        log_filter = _ThreadLogFilter(threading.get_ident(), self.log_lines)
        loggers = [logging.getLogger(name) for name in ("gpt_helpers", "gpt_helpers.training", "gpt_helpers.data",
                                                        "gpt_helpers.evaluation", "gpt_helpers.checkpoints",
                                                        "gpt_helpers.models", "accelerate", "accelerate.accelerator")]
        for log in loggers:
            log.addFilter(log_filter)
        bars_were_on = _transformers_bars(False)
        started = time.perf_counter()
        try:
            train_data, eval_data = self._data(block_size)
            model = copy.deepcopy(self._pretrained)
            self._last_plot = 0.0
            result = train(model, self.tokenizer, train_data, eval_data, config,
                           callbacks=[_StopCallback(self), *self.extra_callbacks])
            self.last_result = result
            self.histories[label] = result.history
            sample = None
            if self.prompt:
                from .evaluation import generate

                sample = generate(result.model, self.tokenizer, self.prompt, max_new_tokens=self.max_new_tokens,
                                  seed=config.seed)[0]
            self.summary.value = self._summary_html(label, config, block_size, result, time.perf_counter() - started, sample)
            self.progress.bar_style = "success"
            self._show_status(f"Done ({label}): {result.stop_reason}.", "success")
        except GPTHelpersError as error:
            self._fail(f"{label} failed: {error}")
        except Exception as error:  # noqa: BLE001 - shown in the panel instead of a traceback
            logger.debug("Panel run failed", exc_info=True)
            self._fail(f"{label} failed with an unexpected {type(error).__name__}: {error}")
        finally:
            for log in loggers:
                log.removeFilter(log_filter)
            _transformers_bars(bars_were_on)
            self._refresh_log()
            self._set_busy(False)
            self._running = False

    def _data(self, block_size: int):
        if block_size not in self._prepared:
            from .data import prepare_dataset

            context = self._context_length()
            train_data, _ = prepare_dataset(self.tokenizer, self._texts["train"], block_size=block_size, max_context=context)
            eval_data = None
            if self._texts["validation"]:
                eval_data, _ = prepare_dataset(self.tokenizer, self._texts["validation"], block_size=block_size,
                                               max_context=context)
            self._prepared[block_size] = (train_data, eval_data)
        return self._prepared[block_size]

    # ----------------------------------------------------------------------------------------------- display
    def _set_busy(self, busy: bool) -> None:
        self.run_button.disabled = busy
        self.stop_button.disabled = not busy
        for control in self.controls.values():
            control.disabled = busy

    @staticmethod
    def _status_html(message: str, kind: str) -> str:
        colours = {"info": "#1f5f9f", "success": "#1b7a2e", "warning": "#9a6700", "error": "#b00020"}
        css = "gh-error" if kind == "error" else f"gh-{kind}"
        return (f"<div class='{css}' style='color:{colours[kind]};white-space:pre-wrap'>"
                f"{'⚠ ' if kind == 'error' else ''}{html.escape(message)}</div>")

    def _show_status(self, message: str, kind: str = "info") -> None:
        self.status.value = self._status_html(message, kind)

    def _fail(self, message: str) -> None:
        self.last_error = message
        self.progress.bar_style = "danger"
        self._show_status(message, "error")

    def _progress_update(self, step: int) -> None:
        self.progress.value = min(step, self.progress.max)

    def _on_log(self, state, history, final: bool = False) -> None:
        record = history.final
        parts = [f"step {state.step}/{self.progress.max}"]
        if record is not None and record.train_loss is not None:
            parts.append(f"loss {record.train_loss:.3f}")
        best = history.best
        if best is not None:
            parts.append(f"best validation perplexity {best.eval_perplexity:.1f} (step {best.step})")
        if record is not None and record.tokens_per_second:
            parts.append(f"{record.tokens_per_second:,.0f} tokens/s")
        self.progress_label.value = " · ".join(parts)
        self._refresh_log()
        now = time.perf_counter()
        if final or now - self._last_plot >= self.plot_interval_seconds:
            self._last_plot = now
            self._draw(history)

    def _draw(self, history) -> None:
        from .plotting import plot_history

        if not history.records:
            return
        figure = plot_history(history, show=False)  # a stand-alone Figure: no pyplot, safe in this thread
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=72)
        png = base64.b64encode(buffer.getvalue()).decode("ascii")
        steps = history.final.step
        self.plot.outputs = ({"output_type": "display_data", "metadata": {},
                              "data": {"image/png": png, "text/plain": f"<loss and perplexity curves up to step {steps}>"}},)

    def _refresh_log(self) -> None:
        lines = list(self.log_lines)[-6:]
        self.log_box.value = ("<pre style='font-size:80%;color:#555;margin:0'>" + html.escape("\n".join(lines)) + "</pre>"
                              if lines else "")

    def _summary_html(self, label: str, config: TrainingConfig, block_size: int, result, seconds: float,
                      sample: str | None) -> str:
        history = result.history
        info = history.info
        used = [("learning rate", f"{config.learning_rate:.1e}"), ("steps (asked / done)", f"{config.max_steps} / "
                f"{history.final.step if history.final else 0}"), ("batch size", config.batch_size),
                ("block size (tokens)", block_size), ("warmup steps", config.warmup_steps),
                ("weight decay", config.weight_decay), ("eval every", config.eval_every), ("seed", config.seed),
                ("schedule", config.lr_schedule), ("device / precision", f"{info.get('device')} / {info.get('precision')}")]
        numbers = [("stopped because", result.stop_reason), ("time", f"{seconds:.1f} s")]
        if result.final_eval is not None:
            numbers.append(("final validation", f"loss {result.final_eval.loss:.4f}, perplexity {result.final_eval.perplexity:.2f}"))
        best = history.best
        if best is not None:
            numbers.append(("best validation", f"perplexity {best.eval_perplexity:.2f} at step {best.step}"))
        facts = history.summary() if history.records else {}
        if facts.get("tokens_per_second"):
            numbers.append(("training speed", f"{facts['tokens_per_second']:,.0f} tokens/s (median)"))
        numbers.append(("saved to", str(result.model_dir or result.output_dir)))
        if sample is not None:
            numbers.append((f"sample: “{self.prompt}”", sample.strip()))
        rows = "".join(f"<tr><td style='padding-right:1em'>{html.escape(k)}</td><td><code>{html.escape(str(v))}</code></td></tr>"
                       for k, v in used)
        results = "".join(f"<tr><td style='padding-right:1em'>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                          for k, v in numbers)
        return (f"<div><b>{label}: settings used</b><table class='gh-config'>{rows}</table>"
                f"<b>Result</b><table class='gh-result'>{results}</table></div>")
