"""Audit the pinned requirements against known vulnerabilities (pip-audit), saying plainly
how many packages could actually be checked.

    .venv/bin/python tools/audit.py [requirements.txt]

Exit 1 when a pinned package has a known vulnerability. A package the vulnerability
service cannot answer for (no network, a private mirror, a package not on PyPI) is
reported as not audited, with the count, and does not fail the run: that is a gap in
what could be checked, not a finding.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def main(requirements: str = "requirements.txt") -> int:
    pip_audit = Path(sys.executable).with_name("pip-audit")
    proc = subprocess.run(  # noqa: S603 - fixed argument list, no shell
        [str(pip_audit), "-r", requirements, "--no-deps", "--disable-pip", "--progress-spinner", "off",
         "-f", "json"], capture_output=True, text=True, timeout=900, check=False)
    try:
        deps = json.loads(proc.stdout)["dependencies"]
    except (json.JSONDecodeError, KeyError):
        print(f"pip-audit gave no result (exit {proc.returncode}); nothing was audited:\n"
              f"{proc.stderr[-2000:]}")
        return 0
    vulnerable = [d for d in deps if d.get("vulns")]
    skipped = [d for d in deps if "skip_reason" in d]
    for d in vulnerable:
        for v in d["vulns"]:
            fix = ", ".join(v.get("fix_versions") or []) or "no fix yet"
            print(f"VULNERABLE {d['name']}=={d['version']}: {v['id']} (fixed in: {fix})")
    audited = len(deps) - len(skipped)
    print(f"pip-audit: {len(deps)} pinned packages, {audited} audited, {len(vulnerable)} with known "
          f"vulnerabilities, {len(skipped)} not audited")
    if skipped:
        print(f"  not audited, e.g. {skipped[0]['skip_reason']} -- the vulnerability service "
              "(PyPI's JSON API or OSV) could not answer for them from this machine")
    return 1 if vulnerable else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
