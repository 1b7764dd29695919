"""How long the README's test command takes on a fresh clone, as CI runs it: `git clone` of the committed HEAD into a
temporary folder beside this checkout (where CI's clone finds ../shared), then `make test` there (a new .venv, the
install, every test with the slow ones).

    python benchmarks/make_test.py                    # writes experiments/performance/make_test.json
    python benchmarks/make_test.py --target test-fast --out <file>   # without the slow tests

Records the install's and the tests' wall time, pytest's summary line, the tests that failed, the slowest, the commit, the machine
and the CPU time other programs took meanwhile (provenance.py). Run it with nothing else running.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from controlnet_lab.provenance import OtherLoad, commit, machine  # noqa: E402


def timed(command: list[str], cwd: Path, log: Path) -> tuple[float, int]:
    started = time.time()
    with log.open("w") as out:
        done = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    return round(time.time() - started, 1), done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "performance" / "make_test.json")
    parser.add_argument("--target", default="test", choices=["test", "test-fast"], help="the make target that runs the tests")
    args = parser.parse_args()
    code = commit()
    # The clone sits beside this checkout, as CI's does, so that what lies beside it (../shared) is found the same way.
    with tempfile.TemporaryDirectory(prefix="make-test-", dir=ROOT.parent) as clone_dir, \
            tempfile.TemporaryDirectory(prefix="make-test-logs-") as folder, OtherLoad() as load:
        clone = Path(clone_dir)
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        install_s, install_rc = timed(["make", "install"], clone, Path(folder) / "install.log")
        tests_s, tests_rc = timed(["make", args.target], clone, Path(folder) / "test.log")
        log = (Path(folder) / "test.log").read_text()
    summary = next((line.strip("= ") for line in reversed(log.splitlines()) if re.search(r"\d+ passed", line)), None)
    slowest = [line.strip() for line in log.splitlines() if re.match(r"^\d+\.\d+s (call|setup|teardown)", line)][:10]
    failed = [line.strip() for line in log.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    record = {
        "what": f"make install, then make {args.target}, in a fresh clone of the commit",
        "install_s": install_s, "install_exit_status": install_rc,
        "tests_s": tests_s, "tests_min": round(tests_s / 60, 1), "tests_exit_status": tests_rc,
        "pytest_summary": summary, "failed": failed, "slowest": slowest,
        "provenance": {**code, "machine": machine(), "other_load": load.result},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
