"""Stage: command line. User errors are one line and a non-zero exit code; the README's test command is CI's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from rtexport.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_user_errors_are_one_line_and_non_zero(capsys):
    assert main(["plan", "no/such/model/folder", "--skip-ratio", "0.25"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["tune", "--target-skip", "1.5"]) == 2
    assert "--target-skip must be in [0, 1)" in capsys.readouterr().err


def test_bad_kv_cache_choices_fail_before_any_work(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["tune-and-export", "--kv-cache", "paged", "--output", str(out)]) == 2
    assert "--kv-cache must be one of growing, preallocated" in capsys.readouterr().err
    assert main(["tune-and-export", "--kv-cache", "preallocated", "--opset", "18", "--output", str(out)]) == 2
    assert "needs --opset 23 or later" in capsys.readouterr().err
    assert main(["tune-and-export", "--logits", "some", "--output", str(out)]) == 2
    assert "--logits must be one of all, selected" in capsys.readouterr().err
    assert main(["tune-and-export", "--attention", "gqa", "--kv-cache", "preallocated", "--output", str(out)]) == 2
    assert "needs --kv-cache preallocated and --logits selected" in capsys.readouterr().err
    assert not out.exists()


def test_unknown_option_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "rtexport.cli", "tune", "--no-such-option"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_supported_lists_the_adapters(capsys):
    assert main(["supported"]) == 0
    assert capsys.readouterr().out.split() == ["llama", "mistral", "qwen2", "qwen3"]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    ci_cmd = [line for line in ci.splitlines() if line.startswith("python3.11 -m venv")][0]
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert ci_cmd in blocks
