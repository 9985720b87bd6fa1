"""What ``snapyard --help`` and the API client import.

The CLI stays quick because its heavy dependencies load only inside the
commands that need them; the client speaks the API through ``actors.wire``
without the server. Asserted on the modules a fresh interpreter has loaded
(a timing would be flaky on a shared machine; an import is not).
"""

from __future__ import annotations

import subprocess
import sys

HEAVY = (
    "pykka",
    "docker",
    "sentry_sdk",
    "uvicorn",
    "starlette",
    "actors.api",
    "actors.app",
    "actors.supervisor",
)


def loaded_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    return set(result.stdout.split())


def test_help_imports_no_heavy_module() -> None:
    loaded = loaded_after(
        "import io\nfrom actors.cli import main\nassert main(['--help'], out=io.StringIO()) == 0"
    )
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))


def test_the_client_does_not_import_the_server() -> None:
    loaded = loaded_after("import actors.client")
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))


def test_a_client_command_does_not_import_the_actor_system() -> None:
    loaded = loaded_after("import actors.cli_jobs")
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))
