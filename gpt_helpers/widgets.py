"""``TrainingPanel``: change the hyperparameters of a fine-tuning run with controls, press Run, watch it train.

    from gpt_helpers.widgets import TrainingPanel
    panel = TrainingPanel(model_name="tiny-gpt2-base", dataset="drug_reviews",
                          config=TrainingConfig(max_steps=60, batch_size=8, output_dir="runs/04_panel"))
    panel                      # shows the controls; press "Run"
    panel.config               # the TrainingConfig the last run used
    panel.history              # its History (also panel.histories: every run of this panel, by label)

Every run starts again from the *pre-trained* weights (a fresh copy of the model loaded once), so runs
differ only by the settings you changed and can be compared on one plot: ``plot_history(panel.histories)``.

The panel is a view: its logic (settings → config, the background thread, Stop, the log) lives in
:class:`gpt_helpers.panel.PanelSession`, which tests and scripts can drive without widgets; the module docstring of
:mod:`gpt_helpers.panel` explains why it is thread-safe.

``ipywidgets`` is imported only when a panel is made, with a clear error if it is missing.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import time
from typing import Any

from .config import TrainingConfig
from .errors import ConfigError, GPTHelpersError
from .panel import LABELS, RANGES, PanelSession, load_panel_texts, round_learning_rate  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)

#: Learning rates offered by the log slider (10^LR_EXPONENTS).
LR_EXPONENTS = (-5.0, -2.0)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024)


def _require_ipywidgets():
    try:
        import ipywidgets
    except ImportError:
        raise GPTHelpersError(
            "The training panel needs ipywidgets: pip install ipywidgets (Colab has it already), then restart the "
            "kernel. Without it, call gpt_helpers.train(...) directly with a TrainingConfig."
        ) from None
    return ipywidgets


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

    def __init__(
        self,
        model_name: str | None = None,
        dataset: str | dict[str, list[str]] = "drug_reviews",
        config: TrainingConfig | None = None,
        *,
        block_size: int = 128,
        model=None,
        tokenizer=None,
        prompt: str | None = None,
        max_new_tokens: int = 30,
        callbacks: list | tuple = (),
        plot_interval_seconds: float = 0.5,
    ):
        widgets = _require_ipywidgets()
        from .models import DEFAULT_MODEL, load_model

        base_config = config or TrainingConfig(
            max_steps=60, batch_size=8, eval_every=20, log_every=5, output_dir="runs/panel"
        )
        if model is None:
            self.model_name = model_name or DEFAULT_MODEL
            model, tokenizer = load_model(self.model_name)
        else:
            if tokenizer is None:
                raise ConfigError("Pass tokenizer= together with model=.")
            self.model_name = model_name or getattr(model, "name_or_path", "model")
        self.session = PanelSession(
            model,
            tokenizer,
            load_panel_texts(dataset),
            base_config,
            prompt=prompt,
            max_new_tokens=max_new_tokens,
            callbacks=callbacks,
            view=self,
        )
        self.dataset_name = dataset if isinstance(dataset, str) else "custom texts"
        self._block_size_default = block_size
        self.plot_interval_seconds = plot_interval_seconds
        self._last_plot = 0.0
        self._build(widgets)

    # The session's state, read through the panel.
    base_config = property(lambda self: self.session.base_config)
    config = property(lambda self: self.session.config, doc="The TrainingConfig of the last run.")
    last_result = property(lambda self: self.session.last_result)
    last_error = property(lambda self: self.session.last_error)
    histories = property(lambda self: self.session.histories, doc="Every run's History, by label (run-01…).")
    history = property(lambda self: self.session.history, doc="The History of the last run (None before any).")
    runs = property(lambda self: self.session.runs)
    running = property(lambda self: self.session.running)
    log_lines = property(lambda self: self.session.log_lines)
    tokenizer = property(lambda self: self.session.tokenizer)

    # ----------------------------------------------------------------------------------------------- set-up
    def _context_length(self) -> int | None:
        from .models import model_context_length

        return model_context_length(self.session.pretrained)

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
            "learning_rate": w.FloatLogSlider(
                value=10**lr_exponent,
                base=10,
                min=LR_EXPONENTS[0],
                max=LR_EXPONENTS[1],
                step=0.1,
                readout_format=".1e",
                description=LABELS["learning_rate"],
                style=style,
                layout=layout,
                continuous_update=False,
            ),
            "max_steps": w.IntText(
                value=c.max_steps or 100, description=LABELS["max_steps"], style=style, layout=layout
            ),
            "batch_size": w.Dropdown(
                options=list(dict.fromkeys(sorted((*BATCH_SIZES, c.batch_size)))),
                value=c.batch_size,
                description=LABELS["batch_size"],
                style=style,
                layout=layout,
            ),
            "block_size": w.Dropdown(
                options=blocks, value=block_default, description=LABELS["block_size"], style=style, layout=layout
            ),
            "warmup_steps": w.IntText(
                value=c.warmup_steps, description=LABELS["warmup_steps"], style=style, layout=layout
            ),
            "weight_decay": w.FloatSlider(
                value=min(c.weight_decay, 0.3),
                min=0.0,
                max=0.3,
                step=0.01,
                readout_format=".2f",
                description=LABELS["weight_decay"],
                style=style,
                layout=layout,
                continuous_update=False,
            ),
            "eval_every": w.IntText(value=c.eval_every, description=LABELS["eval_every"], style=style, layout=layout),
            "seed": w.IntText(value=c.seed, description=LABELS["seed"], style=style, layout=layout),
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

        self.run_button = w.Button(
            description="Run", button_style="success", icon="play", tooltip="Start a run with these settings"
        )
        self.stop_button = w.Button(
            description="Stop",
            button_style="danger",
            icon="stop",
            disabled=True,
            tooltip="End the run after the current step (the history is kept)",
        )
        self.run_button.add_class("gh-run")
        self.stop_button.add_class("gh-stop")
        self.run_button.on_click(lambda _: self.run(block=False))
        self.stop_button.on_click(lambda _: self.stop())
        self.progress = w.IntProgress(
            value=0,
            min=0,
            max=max(c.max_steps or 1, 1),
            description="progress",
            bar_style="info",
            style=style,
            layout=w.Layout(width="420px"),
        )
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
        title = w.HTML(
            f"<b>Fine-tuning panel</b> — model <code>{html.escape(str(self.model_name))}</code>, "
            f"data <code>{html.escape(self.dataset_name)}</code>"
        )
        self.widget = w.VBox(
            [
                title,
                *rows,
                w.HBox([self.run_button, self.stop_button]),
                w.HBox([self.progress, self.progress_label]),
                self.status,
                self.plot,
                self.summary,
                self.log_box,
            ]
        )
        self.widget.add_class("gh-panel")

    def _repr_mimebundle_(self, **kwargs):
        """The widget in a live notebook; a readable placeholder where widgets cannot run (saved outputs, CI)."""
        bundle = self.widget._repr_mimebundle_(**kwargs) or {}
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        data["text/plain"] = (
            f"TrainingPanel for {self.model_name} on {self.dataset_name}: an interactive widget. "
            "Run the notebook in Jupyter to use it."
        )
        return bundle

    def __repr__(self) -> str:
        return f"TrainingPanel(model_name={self.model_name!r}, dataset={self.dataset_name!r}, runs={self.runs})"

    # ----------------------------------------------------------------------------------------------- settings
    def set(self, **values: Any) -> TrainingPanel:
        """Set controls by TrainingConfig field name, as a learner would: ``panel.set(learning_rate=1e-3, max_steps=30)``."""
        unknown = set(values) - set(self.controls)
        if unknown:
            raise ConfigError(
                f"The panel has no control for {', '.join(sorted(unknown))}; controls: {', '.join(self.controls)}."
            )
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
        return self.session.config_from(self._values(), output_dir)

    def _values(self) -> dict[str, Any]:
        return {name: control.value for name, control in self.controls.items() if name != "block_size"}

    @property
    def block_size(self) -> int:
        """The block size (tokens per example) of the controls; it shapes the data, not the TrainingConfig."""
        return int(self.controls["block_size"].value)

    # ----------------------------------------------------------------------------------------------- actions
    def run(self, *, block: bool = True):
        """Start a run with the controls' values, as the Run button does (see :meth:`PanelSession.start`)."""
        return self.session.start(self._values(), self.block_size, block=block)

    def stop(self) -> None:
        """Ask the running training to end after its current step (the Stop button)."""
        if self.session.running:
            self.stop_button.disabled = True
        self.session.stop()

    def wait(self, timeout: float | None = None):
        """Wait for a background run to end; returns :attr:`last_result`."""
        return self.session.wait(timeout)

    # ----------------------------------------------------------------------------------------------- the session's events
    def on_status(self, message: str, kind: str) -> None:
        self.status.value = self._status_html(message, kind)

    def on_busy(self, busy: bool, max_steps: int) -> None:
        if busy:
            self.summary.value = ""
            self.log_box.value = ""
            self.progress.max = max_steps
            self.progress.value = 0
            self.progress.bar_style = "info"
            self._last_plot = 0.0
        else:
            self._refresh_log()
        self.run_button.disabled = busy
        self.stop_button.disabled = not busy
        for control in self.controls.values():
            control.disabled = busy

    def on_progress(self, step: int) -> None:
        self.progress.value = min(step, self.progress.max)

    def on_done(
        self, label: str, config: TrainingConfig, block_size: int, result, seconds: float, sample: str | None
    ) -> None:
        self.summary.value = self._summary_html(label, config, block_size, result, seconds, sample)
        self.progress.bar_style = "success"

    def on_failed(self, message: str) -> None:
        self.progress.bar_style = "danger"
        self.on_status(message, "error")

    # ----------------------------------------------------------------------------------------------- display
    @staticmethod
    def _status_html(message: str, kind: str) -> str:
        colours = {"info": "#1f5f9f", "success": "#1b7a2e", "warning": "#9a6700", "error": "#b00020"}
        css = "gh-error" if kind == "error" else f"gh-{kind}"
        return (
            f"<div class='{css}' style='color:{colours[kind]};white-space:pre-wrap'>"
            f"{'⚠ ' if kind == 'error' else ''}{html.escape(message)}</div>"
        )

    def on_log(self, state, history, final: bool = False) -> None:
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
        self.plot.outputs = (
            {
                "output_type": "display_data",
                "metadata": {},
                "data": {"image/png": png, "text/plain": f"<loss and perplexity curves up to step {steps}>"},
            },
        )

    def _refresh_log(self) -> None:
        lines = list(self.log_lines)[-6:]
        self.log_box.value = (
            "<pre style='font-size:80%;color:#555;margin:0'>" + html.escape("\n".join(lines)) + "</pre>"
            if lines
            else ""
        )

    def _summary_html(
        self, label: str, config: TrainingConfig, block_size: int, result, seconds: float, sample: str | None
    ) -> str:
        history = result.history
        info = history.info
        used = [
            ("learning rate", f"{config.learning_rate:.1e}"),
            ("steps (asked / done)", f"{config.max_steps} / {history.final.step if history.final else 0}"),
            ("batch size", config.batch_size),
            ("block size (tokens)", block_size),
            ("warmup steps", config.warmup_steps),
            ("weight decay", config.weight_decay),
            ("eval every", config.eval_every),
            ("seed", config.seed),
            ("schedule", config.lr_schedule),
            ("device / precision", f"{info.get('device')} / {info.get('precision')}"),
        ]
        numbers = [("stopped because", result.stop_reason), ("time", f"{seconds:.1f} s")]
        if result.final_eval is not None:
            numbers.append(
                (
                    "final validation",
                    f"loss {result.final_eval.loss:.4f}, perplexity {result.final_eval.perplexity:.2f}",
                )
            )
        best = history.best
        if best is not None:
            numbers.append(("best validation", f"perplexity {best.eval_perplexity:.2f} at step {best.step}"))
        facts = history.summary() if history.records else {}
        if facts.get("tokens_per_second"):
            numbers.append(("training speed", f"{facts['tokens_per_second']:,.0f} tokens/s (median)"))
        numbers.append(("saved to", str(result.model_dir or result.output_dir)))
        if sample is not None:
            numbers.append((f"sample: “{self.session.prompt}”", sample.strip()))
        rows = "".join(
            f"<tr><td style='padding-right:1em'>{html.escape(k)}</td><td><code>{html.escape(str(v))}</code></td></tr>"
            for k, v in used
        )
        results = "".join(
            f"<tr><td style='padding-right:1em'>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
            for k, v in numbers
        )
        return (
            f"<div><b>{label}: settings used</b><table class='gh-config'>{rows}</table>"
            f"<b>Result</b><table class='gh-result'>{results}</table></div>"
        )
