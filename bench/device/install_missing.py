"""Install, from .whl/, the wheels whose distribution the device lacks (and a few that openai needs recent)."""
import subprocess, sys, pathlib
from importlib import metadata
from packaging.version import Version

pick = []
for wheel in sorted(pathlib.Path(".whl").glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    recent = name in {"typing_extensions", "pydantic", "pydantic_core", "anyio", "typing_inspection"}
    if have is None or (recent and Version(have) < Version(version)):
        pick.append(str(wheel))
    print(f"{name:22s} have {have} carry {version} -> {'install' if str(wheel) in pick else 'keep'}")
if pick:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", "/tmp/site", *pick], check=True)
