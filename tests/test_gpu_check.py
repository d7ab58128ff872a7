"""`python -m benchmarks.gpu_check` cannot rot: its smoke mode runs here, on CPU, in a process
where `import vllm` fails (the GPU machine it is for has no vLLM)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_without_vllm(tmp_path):
    code = ("import sys; sys.modules['vllm'] = None  # any `import vllm` now raises\n"
            "from benchmarks.gpu_check import main\n"
            f"sys.exit(main(['--smoke', '--out', {str(tmp_path)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert not report["vllm_imported"] and report["smoke"]
    rows = report["rows"]
    assert {r["section"] for r in rows} == {"a attention", "b DenoiseBatch.step",
                                            "c core tokens", "c reference tokens",
                                            "d skipping"}
    assert [r for r in rows if r["ok"] is False] == []
    assert (tmp_path / "gpu_check.md").read_text() in done.stdout
