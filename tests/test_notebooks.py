"""Every lesson runs headless with its CI parameters, and every committed notebook is a clean lesson."""

from __future__ import annotations

import json

import pytest

from gpt_helpers.course import LESSONS, NOTEBOOKS_DIR, run_lesson


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
