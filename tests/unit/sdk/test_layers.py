"""The SDK's place in the layers: it reaches the services over gRPC only, and its audit runs in report order."""

from __future__ import annotations

import json
import subprocess
import sys

from cli.launcher import REPO


def test_sdk_imports_no_server_training_or_cli_module() -> None:
    code = (
        "import json, sys\n"
        "import sdk, sdk.audit, sdk.audit_report, sdk.client\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('training', 'cli')"
        " or (m.startswith('services.') and not m.startswith('services.api')))))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.splitlines()[-1]) == []


def test_audit_steps_run_in_the_report_order() -> None:
    from sdk.audit import STEPS
    from sdk.audit_report import SECTIONS

    assert tuple(name for name, _ in STEPS) == SECTIONS
