"""The prepared GPU check (benchmarks/gpu_check.sh) runs on CPUs too, so that it cannot rot between GPU sessions."""
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_gpu_check_passes_on_cpu(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600,
                          env={"PATH": f"{sys.executable.rsplit('/', 1)[0]}:/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("method "))) + 1:][:2]
    assert [row.split()[0] for row in table] == ["mae", "dino"]
    for row in table:
        ips, gflop, mfu = float(row.split()[1]), float(row.split()[2]), float(row.split()[3].rstrip("%"))
        assert ips > 0 and gflop > 0 and 0 < mfu < 100
    assert "[gpu_check] OK" in proc.stdout and "resuming from step" in (tmp_path / "mae.log").read_text()
