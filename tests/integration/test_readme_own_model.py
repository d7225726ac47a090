"""The README's "Convert your own model" section, run as a new user would run it.

Its code blocks are marked in README.md with `<!-- readme-test: NAME -->`: a file name (the block
is that file) or `run` (the shell commands). The test writes the files into a fresh folder, runs
the commands there with this venv's `python` and `onnxforge` first on PATH, then the Python-API
snippet, and checks each run passed and wrote its report.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Convert your own model"
MARKED_BLOCK = re.compile(r"<!-- readme-test: (?P<name>[\w.]+) -->\n```\w*\n(?P<body>.*?)\n```", re.DOTALL)


def readme_blocks() -> dict[str, str]:
    """The marked code blocks of the README's section, by name."""
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end != -1 else None]
    return {match["name"]: match["body"] + "\n" for match in MARKED_BLOCK.finditer(section)}


def test_section_has_every_step() -> None:
    blocks = readme_blocks()
    assert set(blocks) == {"my_model.py", "make_data.py", "job.toml", "run", "convert_in_python.py"}
    assert "onnxforge convert job.toml" in blocks["run"]


def assert_published(folder: Path) -> None:
    for name in ("report.html", "report.md", "report.json", "manifest.json", "model.fp32.onnx", "model.int8.onnx"):
        assert (folder / name).is_file(), f"{name} missing from {folder}"
    assert json.loads((folder / "report.json").read_text())["verdict"] == "pass"


@pytest.mark.slow
def test_readme_converts_own_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = readme_blocks()
    for name, body in blocks.items():
        if name != "run":
            (tmp_path / name).write_text(body, encoding="utf-8")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", blocks["run"]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS" in done.stdout
    assert_published(tmp_path / "out")

    # The Python snippet, in this process (torch is imported once), from the same folder.
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(tmp_path / "convert_in_python.py"), run_name="__main__")
    assert capsys.readouterr().out.startswith("pass ")
    assert_published(tmp_path / "out_python")
