"""The long fuzzing pass: schemathesis against /openapi.json, through the same test CI runs briefly.

Runs tests/test_fuzz.py with T2V_FUZZ_EXAMPLES examples per operation (default 200; 11 operations,
so at least 2000 cases once schemathesis adds its own negative, coverage and method probes) and
prints how many cases ran per operation and per status class. Any 5xx or answer that breaks the
spec fails the run, with a curl line to reproduce it.

    python bench/fuzz.py
    python bench/fuzz.py --examples 500
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--examples", type=int, default=200, help="hypothesis examples per operation")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "fuzz.json"
        env = {**os.environ, "T2V_FUZZ_EXAMPLES": str(args.examples), "T2V_FUZZ_REPORT": str(report)}
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               str(ROOT / "tests" / "test_fuzz.py")], cwd=ROOT, env=env)
        seen = json.loads(report.read_text()) if report.exists() else {}
    operations = {k: v for k, v in seen.items() if not k.startswith("status")}
    print(f"\n{sum(operations.values())} cases over {len(operations)} operations; "
          f"pytest exit code {done.returncode} (0: no 5xx and no answer that breaks the spec)")
    for key in sorted(seen):
        print(f"  {key}: {seen[key]}")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
