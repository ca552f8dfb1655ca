"""Run the course's notebooks headless (papermill) and summarise each lesson: status, time, numbers, figures.

    python -m gpt_helpers course                 # every lesson with its default parameters
    python -m gpt_helpers course --ci            # every lesson with the small CI parameters
    python -m gpt_helpers course --only 04 06    # some lessons
    python -m gpt_helpers course --write-outputs # refresh the committed notebooks' outputs (maintainers)

Executed copies go to an ignored run folder; a failing cell fails the run with the lesson and cell named.
A lesson reports key numbers by calling :func:`record` (a no-op outside the runner).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import GPTHelpersError

logger = logging.getLogger(__name__)

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
#: The course's git repository, which each lesson's Colab install cell clones (every lesson's COURSE_REPO parameter).
COURSE_REPO = "https://github.com/<owner>/<course-repo>.git"
RESULTS_ENV = "GPT_HELPERS_LESSON_RESULTS"


@dataclass(frozen=True)
class Lesson:
    """A notebook of the course and the small parameters CI runs it with."""

    notebook: str
    title: str
    ci_parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def number(self) -> str:
        return self.notebook[:2]


LESSONS: list[Lesson] = [
    Lesson("00_setup.ipynb", "Set up", {"MAX_NEW_TOKENS": 10}),
    Lesson(
        "01_choose_model.ipynb",
        "Choose a pre-trained model",
        {
            "EVAL_BATCHES": 2,
            "SPEED_STEPS": 2,
            "CPU_BATCH_SIZE": 2,
            "CPU_BLOCK_SIZE": 32,
            "BPB_TEXTS": 3,
            "EVAL_BLOCK_SIZE": 32,
            "MAX_NEW_TOKENS": 5,
        },
    ),
    Lesson("02_prepare_data.ipynb", "Prepare your dataset", {"SPEED_TEXTS": 8, "EOS_STEPS": 2}),
    Lesson(
        "03_training_environment.ipynb",
        "The training environment",
        {
            "BLOCK_SIZE": 64,
            "MEMORY_BATCH_SIZES": [2, 4],
            "MEMORY_STEPS": 2,
            "EFFECTIVE_BATCH": 4,
            "MAX_STEPS": 4,
            "CHECKPOINT_BATCH_SIZE": 4,
            "CHECKPOINT_STEPS": 1,
            "SPEED_BATCH_SIZE": 1,
        },
    ),
    Lesson(
        "04_fine_tune.ipynb",
        "Fine-tune",
        {
            "MAX_STEPS": 8,
            "EVAL_EVERY": 4,
            "EVAL_BATCHES": 2,
            "BATCH_SIZE": 4,
            "BLOCK_SIZE": 64,
            "MAX_NEW_TOKENS": 8,
            "LR_GRID": [5e-4, 2e-3],
            "SEEDS": [0, 1],
            "COMPARE_STEPS": 2,
            "REAL_STEPS": 2,
            "REAL_BATCH_SIZE": 2,
            "REAL_BLOCK_SIZE": 32,
            "REAL_EVAL_BATCHES": 1,
            "EXERCISE_STEPS": 4,
        },
    ),
    Lesson(
        "05_monitor_evaluate.ipynb",
        "Monitor and evaluate",
        {
            "TRAIN_TEXTS": 30,
            "BLOCK_SIZE": 32,
            "MAX_STEPS": 12,
            "EVAL_EVERY": 4,
            "EVAL_BATCHES": 2,
            "PATIENCE": 2,
            "COMPARE_LEARNING_RATES": [1e-3, 3e-3],
            "COMPARE_STEPS": 4,
            "SEEDS": [0, 1],
            "TRACKING_STEPS": 2,
        },
    ),
    Lesson(
        "06_troubleshoot.ipynb",
        "Troubleshoot",
        {
            "BLOCK_SIZE": 32,
            "STEPS": 6,
            "EVAL_EVERY": 2,
            "EVAL_BATCHES": 1,
            "OVERFIT_STEPS": 8,
            "MORE_TEXTS": 40,
            "FEW_STEPS": 3,
            "SPEED_STEPS": 3,
            "SPEED_BLOCK": 64,
        },
    ),
    Lesson(
        "07_transfer_strategies.ipynb",
        "Transfer-learning strategies",
        {
            "STRATEGIES": ["full", "head_only", "lora", "from_scratch"],
            "STEPS": 8,
            "EVAL_EVERY": 4,
            "EVAL_BATCHES": 2,
            "FRACTIONS": [0.05],
            "MEMORY_BATCH_SIZES": [1],
            "SEEDS": [0, 1],
            "REAL_STRATEGIES": ["lora", "frozen_body"],
            "REAL_STEPS": 1,
            "REAL_BATCH_SIZE": 1,
            "REAL_BLOCK_SIZE": 32,
            "REAL_EVAL_BATCHES": 1,
        },
    ),
    Lesson(
        "08_chatbot.ipynb",
        "A chatbot from chat logs",
        {
            "MAX_STEPS": 8,
            "EVAL_EVERY": 4,
            "WARMUP_STEPS": 2,
            "LOG_EVERY": 4,
            "MAX_NEW_TOKENS": 12,
            "N_EVAL_PROMPTS": 6,
            "N_TABLE_PROMPTS": 2,
            "REAL_STEPS": 2,
            "REAL_BATCH_SIZE": 2,
            "REAL_BLOCK_SIZE": 64,
            "N_REAL_PROMPTS": 1,
            "REAL_EVAL_BATCHES": 1,
        },
    ),
    Lesson("09_save_share.ipynb", "Save, share and use", {"MAX_STEPS": 6, "EVAL_EVERY": 3, "WARMUP_STEPS": 2}),
    Lesson(
        "10_sampling.ipynb",
        "How a model chooses its words: sampling",
        {"N_SAMPLES": 2, "MAX_NEW_TOKENS": 5, "LONG_TOKENS": 12, "SHOWN_TOKENS": 5},
    ),
    Lesson(
        "11_classification.ipynb",
        "Transfer learning for classification",
        {  # the real model's features of every review take minutes on one CPU thread: the committed run shows them
            "REAL_MODEL": "",
            "MAX_LENGTH": 24,
            "STEPS": 4,
            "STAGE1_STEPS": 2,
            "SEEDS": [0, 1],
            "SIZES": [50, 0],
        },
    ),
]


def record(**numbers: Any) -> None:
    """Report a lesson's key numbers to the course runner (does nothing when run by hand).

    >>> record(validation_perplexity=42.0)
    """
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    target = Path(path)
    existing = json.loads(target.read_text(encoding="utf-8")) if target.exists() else {}
    existing.update({key: _plain(value) for key, value in numbers.items()})
    target.write_text(json.dumps(existing, indent=1), encoding="utf-8")


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if hasattr(value, "item"):
        return _plain(value.item())
    return value


@dataclass
class LessonResult:
    """The outcome of one executed lesson."""

    lesson: str
    status: str
    seconds: float
    numbers: dict[str, Any] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    error: str | None = None


#: An absolute path into an installed package (in a warning's source line): the machine's prefix is left out.
_INSTALLED_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][^\s'\"/\\]+)+[/\\](?=site-packages[/\\])")


def machine_free(text: str) -> str:
    """``text`` with the prefix of installed-package paths replaced by ``...`` (``.../site-packages/peft/x.py``).

    >>> machine_free("/home/ann/.venv/lib/python3.11/site-packages/peft/utils.py:3: UserWarning: …")
    '.../site-packages/peft/utils.py:3: UserWarning: …'
    """
    return _INSTALLED_PATH.sub(".../", text)


def clean_notebook(notebook) -> None:
    """Strip run noise so a committed notebook diffs cleanly: papermill timings, widget state, widget views, and
    the machine's own folders in the paths of library warnings."""
    notebook.metadata.pop("papermill", None)
    notebook.metadata.pop("widgets", None)
    for cell in notebook.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                output["text"] = machine_free(output["text"])
            data = output.get("data")
            if data and "application/vnd.jupyter.widget-view+json" in data:
                data.pop("application/vnd.jupyter.widget-view+json")
                data.setdefault("text/plain", "[interactive widget: run the notebook to use it]")


def _save_figures(notebook, folder: Path, stem: str) -> list[str]:
    saved = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            image = output.get("data", {}).get("image/png")
            if image:
                path = folder / f"{stem}-{len(saved) + 1:02d}.png"
                path.write_bytes(base64.b64decode(image))
                saved.append(str(path))
    return saved


def _failed_cell(notebook) -> str:
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                first_line = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
                return f"cell {index} ({first_line[:60]!r}): {output.get('ename')}: {output.get('evalue')}"
    return "unknown cell"


def run_lesson(
    lesson: Lesson,
    out: Path,
    *,
    ci: bool = False,
    write_outputs: bool = False,
    extra_parameters: dict[str, Any] | None = None,
    timeout: int = 1200,
) -> LessonResult:
    """Execute one lesson with papermill into ``out``; never raises for a failing cell (see the result)."""
    import nbformat
    import papermill

    source = NOTEBOOKS_DIR / lesson.notebook
    if not source.exists():
        return LessonResult(lesson.notebook, "missing", 0.0, error=f"{source} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    executed = out / lesson.notebook
    results_file = out / f"{Path(lesson.notebook).stem}.numbers.json"
    results_file.unlink(missing_ok=True)
    parameters = dict(lesson.ci_parameters) if ci else {}
    parameters.update(extra_parameters or {})
    os.environ[RESULTS_ENV] = str(results_file.resolve())
    started = time.perf_counter()
    status, error = "passed", None
    try:
        papermill.execute_notebook(
            str(source),
            str(executed),
            parameters=parameters,
            cwd=str(NOTEBOOKS_DIR),
            kernel_name="python3",
            progress_bar=False,
            execution_timeout=timeout,
        )
    except Exception as failure:  # papermill raises its own error type after writing the executed copy
        status = "failed"
        error = _failed_cell(nbformat.read(executed, as_version=4)) if executed.exists() else str(failure)[:500]
    finally:
        os.environ.pop(RESULTS_ENV, None)
    seconds = time.perf_counter() - started
    notebook = nbformat.read(executed, as_version=4) if executed.exists() else None
    figures = _save_figures(notebook, out, Path(lesson.notebook).stem) if notebook is not None else []
    numbers = json.loads(results_file.read_text(encoding="utf-8")) if results_file.exists() else {}
    if write_outputs and status == "passed" and notebook is not None and not parameters:
        clean_notebook(notebook)
        nbformat.write(notebook, source)
    return LessonResult(lesson.notebook, status, round(seconds, 1), numbers, figures, error)


def run_course(
    *,
    only: list[str] | None = None,
    ci: bool = False,
    out: str | os.PathLike = "runs/course",
    write_outputs: bool = False,
) -> list[LessonResult]:
    """Execute the chosen lessons in order and write ``summary.md`` and ``summary.json`` into ``out``."""
    if write_outputs and ci:
        raise GPTHelpersError(
            "--write-outputs refreshes the committed notebooks with their DEFAULT parameters; drop --ci."
        )
    chosen = [lesson for lesson in LESSONS if not only or lesson.number in only or lesson.notebook in only]
    if not chosen:
        raise GPTHelpersError(f"No lesson matches {only}. Lessons: {', '.join(lesson.number for lesson in LESSONS)}.")
    out = Path(out)
    results = []
    for lesson in chosen:
        logger.info("Running lesson %s …", lesson.notebook)
        result = run_lesson(lesson, out, ci=ci, write_outputs=write_outputs)
        logger.info(
            "%s: %s in %.0f s%s",
            lesson.notebook,
            result.status,
            result.seconds,
            f" — {result.error}" if result.error else "",
        )
        results.append(result)
    write_summary(results, out, ci=ci)
    return results


def write_summary(results: list[LessonResult], out: Path, *, ci: bool) -> Path:
    """A markdown table and a JSON file of the run."""
    lines = [
        f"# Course run ({'CI parameters' if ci else 'default parameters'})",
        "",
        "| lesson | status | seconds | key numbers | figures |",
        "| --- | --- | ---: | --- | ---: |",
    ]
    for r in results:
        numbers = ", ".join(f"{k}={v}" for k, v in r.numbers.items()) or "—"
        status = r.status if not r.error else f"{r.status}: {r.error}"
        lines.append(f"| {r.lesson} | {status} | {r.seconds:.0f} | {numbers} | {len(r.figures)} |")
    total = sum(r.seconds for r in results)
    lines += [
        "",
        f"Total: {total:.0f} s for {len(results)} lessons; {sum(r.status == 'passed' for r in results)} passed.",
    ]
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "summary.json").write_text(json.dumps([asdict(r) for r in results], indent=1), encoding="utf-8")
    return out / "summary.md"
