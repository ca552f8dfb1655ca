"""The training panel's logic without any widget: settings → a validated config, one run at a time in a background
thread, Stop, and events for whatever shows them (:class:`gpt_helpers.widgets.TrainingPanel`, or a test).

Thread safety (why the session is built the way it is)
------------------------------------------------------
Training runs in a background thread so that the kernel's main thread stays free to receive button clicks (Stop
must work while training runs). The rules that keep this safe:

* The worker never *reads* a control. The settings are read once, in the thread that pressed Run, into a
  validated :class:`~gpt_helpers.config.TrainingConfig`; the view disables its controls until the run ends, so
  what they show is what is used.
* The worker only *reports* to the view (:class:`PanelView`), whose methods only assign widget traits: one comm
  message each, sent through ipykernel's IOPub channel, which is thread-safe. The view never uses
  ``with output:`` from the worker, never ``print``s, and never touches pyplot (a stand-alone ``Figure`` instead).
* transformers' own progress bars (saving a model) are switched off while a run lasts.
* Log records from the worker thread are diverted into the session's ``log_lines`` by a filter keyed on the
  thread id, so they cannot land in whichever cell happens to be running.
* Stop sets a ``threading.Event``; a training callback checks it after each optimizer step and sets
  ``state.stop_requested``, the loop's own clean exit (final evaluation, checkpoint, model and history saved).
* One run at a time: :meth:`PanelSession.start` refuses a second while one is active. A kernel interrupt does
  not reach the worker thread: use Stop.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Protocol

from .checkpoints import transformers_bars_off
from .config import TrainingConfig
from .errors import ConfigError, GPTHelpersError

logger = logging.getLogger(__name__)

#: Ranges of the whole-number settings a panel offers: (lowest, highest).
RANGES = {"max_steps": (1, 100_000), "warmup_steps": (0, 10_000), "eval_every": (1, 100_000), "seed": (0, 2**31 - 1)}
#: How each setting is called where a learner reads it.
LABELS = {
    "learning_rate": "learning rate",
    "max_steps": "steps",
    "batch_size": "batch size",
    "block_size": "block size",
    "warmup_steps": "warmup",
    "weight_decay": "weight decay",
    "eval_every": "eval every",
    "seed": "seed",
}
LOGGERS = ("gpt_helpers", "accelerate")


def round_learning_rate(value: float) -> float:
    """A learning rate with two significant digits (10^-3.3 → 5.0e-4), the number that is used and shown.

    >>> round_learning_rate(0.000501187)
    0.0005
    """
    return float(f"{value:.2g}")


class PanelView(Protocol):
    """What a session reports to the view that shows it (every method is called from the worker thread too)."""

    def on_status(self, message: str, kind: str) -> None: ...
    def on_busy(self, busy: bool, max_steps: int) -> None: ...
    def on_progress(self, step: int) -> None: ...
    def on_log(self, state, history, final: bool) -> None: ...
    def on_done(
        self, label: str, config: TrainingConfig, block_size: int, result, seconds: float, sample: str | None
    ) -> None: ...
    def on_failed(self, message: str) -> None: ...


class _SilentView:
    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class _PanelCallback:
    """Training callback: relays Stop, progress and the log events (runs in the worker thread)."""

    def __init__(self, session: PanelSession):
        self.session = session

    def on_train_begin(self, state) -> None:
        self.session.view.on_progress(state.step)

    def on_step_end(self, state) -> None:
        if self.session._stop_event.is_set() and not state.stop_requested:
            state.stop_requested = True
            state.stop_reason = f"stopped from the panel after step {state.step}"
        self.session.view.on_progress(state.step)

    def on_log(self, state, history) -> None:
        self.session.view.on_log(state, history, False)

    def on_train_end(self, state, history) -> None:
        self.session.view.on_log(state, history, True)


class _ThreadLogFilter(logging.Filter):
    """Keeps the worker thread's log records out of the notebook's handlers and in the session's log lines."""

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


def load_panel_texts(dataset: str | dict[str, list[str]]) -> dict[str, list[str]]:
    """A course dataset's train and validation texts, or a ``{"train": [...], "validation": [...]}`` dict."""
    from .data import load_course_dataset

    if isinstance(dataset, str):
        return {
            "train": load_course_dataset(dataset, "train"),
            "validation": load_course_dataset(dataset, "validation"),
        }
    if isinstance(dataset, dict) and "train" in dataset:
        return {"train": list(dataset["train"]), "validation": list(dataset.get("validation") or [])}
    raise ConfigError("dataset must be a course dataset name or a dict {'train': [texts], 'validation': [texts]}.")


class PanelSession:
    """Runs of one pre-trained model on one dataset, each from a fresh copy of the pre-trained weights, so that runs
    differ only by their settings and can be compared on one plot (``plot_history(session.histories)``).

    >>> from gpt_helpers import load_model
    >>> model, tokenizer = load_model()
    >>> session = PanelSession(model, tokenizer, {"train": ["Some text to learn."] * 40},
    ...                        TrainingConfig(max_steps=2, batch_size=2, output_dir="/tmp/panel-doctest", plot=False))
    >>> session.config_from({"learning_rate": 1e-3, "max_steps": 0}).max_steps
    Traceback (most recent call last):
    ...
    gpt_helpers.errors.ConfigError: steps must be a whole number from 1 to 100,000, not 0.
    >>> session.start({"max_steps": 2}, block_size=16).history.final.step
    2
    """

    def __init__(
        self,
        model,
        tokenizer,
        texts: str | dict[str, list[str]],
        base_config: TrainingConfig,
        *,
        prompt: str | None = None,
        max_new_tokens: int = 30,
        callbacks: list | tuple = (),
        view: PanelView | None = None,
    ):
        if not isinstance(base_config, TrainingConfig):
            raise ConfigError(f"config must be a TrainingConfig, not {type(base_config).__name__}.")
        self.pretrained, self.tokenizer, self.base_config = model, tokenizer, base_config
        self.texts = load_panel_texts(texts) if isinstance(texts, str) else {"validation": [], **texts}
        self.prompt, self.max_new_tokens, self.extra_callbacks = prompt, max_new_tokens, list(callbacks)
        self.view: PanelView = view or _SilentView()
        self.config: TrainingConfig = base_config  # the config of the last run (the starting one before any)
        self.last_result = None
        self.last_error: str | None = None
        self.histories: dict[str, Any] = {}
        self.runs = 0
        self.log_lines: deque = deque(maxlen=200)
        self._prepared: dict[int, tuple[Any, Any]] = {}
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.running = False

    # ----------------------------------------------------------------------------------------------- settings
    def config_from(self, values: dict[str, Any], output_dir: str | None = None) -> TrainingConfig:
        """The validated TrainingConfig of ``values`` (the panel's settings; ``ConfigError`` with the reason)."""
        values = dict(values)
        if "learning_rate" in values:
            values["learning_rate"] = round_learning_rate(values["learning_rate"])
        for name, (low, high) in RANGES.items():
            if name in values:
                value = values[name]
                if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                    raise ConfigError(f"{LABELS[name]} must be a whole number from {low:,} to {high:,}, not {value!r}.")
        if "weight_decay" in values:
            values["weight_decay"] = round(float(values["weight_decay"]), 4)
        return self.base_config.replace(**values, progress=False, output_dir=output_dir or self.base_config.output_dir)

    @property
    def history(self):
        """The History of the last run (``None`` before any)."""
        return self.last_result.history if self.last_result is not None else None

    # ----------------------------------------------------------------------------------------------- actions
    def start(self, values: dict[str, Any], block_size: int, *, block: bool = True):
        """Start a run with ``values`` (TrainingConfig fields) and examples of ``block_size`` tokens.

        ``block=True`` trains in the calling thread and returns the :class:`~gpt_helpers.training.TrainResult`,
        or ``None`` when the settings were refused or training failed (the reason is in :attr:`last_error`);
        ``block=False`` trains in a background thread, so that Stop stays live.
        """
        with self._lock:
            if self.running:
                self.view.on_status("A run is already in progress: press Stop first.", "warning")
                return None
            self.last_error = None
            try:
                label = f"run-{self.runs + 1:02d}"
                config = self.config_from(values, str(Path(self.base_config.output_dir) / label))
            except GPTHelpersError as error:
                # Nothing ran: only the status changes; the view still shows the last run.
                self.last_error = f"Cannot start: {error}"
                self.view.on_status(self.last_error, "error")
                return None
            self.runs += 1
            self.running = True
            self._stop_event.clear()
            self.config = config
            self.log_lines.clear()
            self.view.on_busy(True, config.max_steps)
            self.view.on_status(f"Starting {label}: preparing data and a fresh copy of the model…", "info")
        if block:
            self._work(label, config, block_size)
            return self.last_result if self.last_error is None else None
        self._thread = threading.Thread(
            target=self._work, args=(label, config, block_size), name=f"panel-{label}", daemon=True
        )
        self._thread.start()
        return None

    def stop(self) -> None:
        """Ask the running training to end after its current step."""
        if self.running:
            self._stop_event.set()
            self.view.on_status("Stopping after the current step…", "warning")

    def wait(self, timeout: float | None = None):
        """Wait for a background run to end; returns :attr:`last_result`."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.last_result

    # ----------------------------------------------------------------------------------------------- the worker
    def _work(self, label: str, config: TrainingConfig, block_size: int) -> None:
        """One run, start to end; every failure is reported to the view and kept in ``last_error``, never raised."""
        from .training import train

        log_filter = _ThreadLogFilter(threading.get_ident(), self.log_lines)
        loggers = [
            logger
            for name, logger in logging.root.manager.loggerDict.items()
            if isinstance(logger, logging.Logger) and name.split(".")[0] in LOGGERS
        ]
        loggers += [logging.getLogger(name) for name in LOGGERS]
        for log in loggers:
            log.addFilter(log_filter)
        started = time.perf_counter()
        try:
            with transformers_bars_off():
                train_data, eval_data = self.data(block_size)
                result = train(
                    copy.deepcopy(self.pretrained),
                    self.tokenizer,
                    train_data,
                    eval_data,
                    config,
                    callbacks=[_PanelCallback(self), *self.extra_callbacks],
                )
            self.last_result = result
            self.histories[label] = result.history
            sample = None
            if self.prompt:
                from .evaluation import generate

                sample = generate(
                    result.model, self.tokenizer, self.prompt, max_new_tokens=self.max_new_tokens, seed=config.seed
                )[0]
            self.view.on_done(label, config, block_size, result, time.perf_counter() - started, sample)
            self.view.on_status(f"Done ({label}): {result.stop_reason}.", "success")
        except GPTHelpersError as error:
            self._fail(f"{label} failed: {error}")
        except Exception as error:  # noqa: BLE001 - reported to the view instead of a traceback
            logger.debug("Panel run failed", exc_info=True)
            self._fail(f"{label} failed with an unexpected {type(error).__name__}: {error}")
        finally:
            for log in loggers:
                log.removeFilter(log_filter)
            self.running = False
            self.view.on_busy(False, config.max_steps)

    def data(self, block_size: int):
        """The training and validation examples of ``block_size`` tokens (prepared once per size)."""
        if block_size not in self._prepared:
            from .data import prepare_dataset
            from .models import model_context_length

            context = model_context_length(self.pretrained)
            train_data, _ = prepare_dataset(
                self.tokenizer, self.texts["train"], block_size=block_size, max_context=context
            )
            eval_data = None
            if self.texts["validation"]:
                eval_data, _ = prepare_dataset(
                    self.tokenizer, self.texts["validation"], block_size=block_size, max_context=context
                )
            self._prepared[block_size] = (train_data, eval_data)
        return self._prepared[block_size]

    def _fail(self, message: str) -> None:
        self.last_error = message
        self.view.on_failed(message)
