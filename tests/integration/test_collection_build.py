"""The checkout builds into an installable collection without the project-only folders."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"
PROJECT_ONLY = ("inventories/", "molecule/", "tests/", "benchmarks/", "examples/", "scripts/", ".collections/")


def run(*command: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert completed.returncode == 0, f"{' '.join(command)} failed:\n{completed.stdout}\n{completed.stderr}"
    return completed.stdout


def test_build_installs_and_documents_modules(tmp_path: Path) -> None:
    # Run outside the checkout with its ansible.cfg and its .collections link out of the way, so only the
    # installed copy can be found.
    env = {key: value for key, value in os.environ.items() if not key.startswith("ANSIBLE_")}
    run(
        str(BIN / "ansible-galaxy"),
        "collection",
        "build",
        "--output-path",
        str(tmp_path),
        str(ROOT),
        cwd=tmp_path,
        env=env,
    )
    tarball = next(tmp_path.glob("sidekiq_ops-fleet-*.tar.gz"))
    with tarfile.open(tarball) as archive:
        names = archive.getnames()

    assert "plugins/modules/queue_info.py" in names
    assert "roles/sidekiq/tasks/main.yml" in names
    assert "roles/redis/tasks/main.yml" in names
    leaked = [name for name in names if name.startswith(PROJECT_ONLY)]
    assert leaked == []

    installed = tmp_path / "collections"
    run(
        str(BIN / "ansible-galaxy"),
        "collection",
        "install",
        "--force",
        "-p",
        str(installed),
        str(tarball),
        cwd=tmp_path,
    )
    env["ANSIBLE_COLLECTIONS_PATH"] = str(installed)
    listing = run(str(BIN / "ansible-doc"), "-l", "sidekiq_ops.fleet", cwd=tmp_path, env=env)
    assert "sidekiq_ops.fleet.queue_info" in listing
    assert "sidekiq_ops.fleet.sidekiq_instance" in listing
