"""The notebooks run top to bottom on their small default inputs and draw their figures."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
PLOTLY_MIME = "application/vnd.plotly.v1+json"


def execute(name: str, tmp_path: Path):
    """Run a notebook in a fresh kernel of this interpreter, from the repository root."""
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    # A kernel spec in a temporary folder, pointing at this interpreter, so the test does not
    # depend on which kernels the machine has registered.
    kernel_dir = tmp_path / "kernels" / "tide-test"
    kernel_dir.mkdir(parents=True)
    (kernel_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "tide test", "language": "python"}))
    environment = {"JUPYTER_PATH": str(tmp_path), "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    previous = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)
    try:
        client = nbclient.NotebookClient(notebook, kernel_name="tide-test", timeout=120,
                                         resources={"metadata": {"path": str(ROOT)}})
        client.execute()
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return notebook


def outputs(notebook) -> list[dict]:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]


def figures(notebook) -> list[dict]:
    return [output["data"][PLOTLY_MIME] for output in outputs(notebook)
            if output.get("output_type") == "display_data" and PLOTLY_MIME in output.get("data", {})]


def printed(notebook) -> str:
    return "".join(output.get("text", "") for output in outputs(notebook) if output.get("output_type") == "stream")


def test_notebooks_stored_without_outputs():
    for path in (ROOT / "notebooks").glob("*.ipynb"):
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [], f"{path.name} has stored outputs"
                assert cell.execution_count is None, f"{path.name} has execution counts"


@pytest.mark.slow
def test_trace_replay_notebook(tmp_path):
    notebook = execute("trace_replay.ipynb", tmp_path)
    assert not [output for output in outputs(notebook) if output.get("output_type") == "error"]
    drawn = figures(notebook)
    # The heatmaps, the policy comparison and the timeline.
    assert len(drawn) == 3
    assert [trace["type"] for trace in drawn[0]["data"]] == ["heatmap", "heatmap"]
    assert [bar["x"] for bar in drawn[1]["data"]] == [["tide", "every-step", "static", "lru-fetch", "cpu-experts",
                                                       "all-gpu"]]
    text = printed(notebook)
    assert "distinct experts per pass" in text
    assert "cpu-experts" in text


@pytest.mark.slow
def test_capacity_planning_notebook(tmp_path):
    notebook = execute("capacity_planning.ipynb", tmp_path)
    assert not [output for output in outputs(notebook) if output.get("output_type") == "error"]
    drawn = figures(notebook)
    assert len(drawn) == 2
    assert "throughput against GPU memory" in drawn[0]["layout"]["title"]["text"]
    assert "speedup of tide" in drawn[1]["layout"]["title"]["text"]
    text = printed(notebook)
    assert "24 points: 24 simulated" in text
    assert "speedup" in text
