"""The wheelhouse that takes MLflow, Optuna and Fashion-MNIST to the GPU machine, which has no registry.

    python -m benchmarks.gpu.wheelhouse check DIR            # here: DIR holds exactly wheelhouse.txt, closed
    python -m benchmarks.gpu.wheelhouse data SOURCE DEST     # here: the Fashion-MNIST files the GPU checks read
    python -m benchmarks.gpu.wheelhouse verify               # there, once installed: every requirement is met

``benchmarks/gpu/build_wheelhouse.sh`` runs the first two, ``benchmarks/gpu/run.sh`` the last. Only the
standard library and ``packaging`` are imported at the top, so that ``verify`` runs on the machine's
own Python before anything is installed.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import shutil
import struct
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

HERE = Path(__file__).resolve().parent
PINS_FILE = HERE / "wheelhouse.txt"
MACHINE_FILE = HERE / "machine-packages.txt"
# Carried although the machine has them (wheelhouse.txt says why): they shadow the machine's copies.
OVERRIDES = frozenset({"protobuf", "typing-extensions"})
# The machine's interpreter, as markers see it: which requirements of a wheel apply there.
MACHINE_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
                   "implementation_version": "3.12.3", "platform_python_implementation": "CPython",
                   "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                   "os_name": "posix", "platform_release": "", "platform_version": "", "extra": ""}
# Fashion-MNIST as the GPU checks read it: the training files whole (a 60,000-image epoch is timed),
# the first TEST_IMAGES of the test set (tests evaluate on at most 500, studies on the whole file).
TRAIN_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
TEST_IMAGES = 2000


def read_list(path: Path = PINS_FILE) -> tuple[dict[str, str], set[str]]:
    """(name -> pinned version of each wheel carried, names deliberately not carried: ``!name``)."""
    pins: dict[str, str] = {}
    left_out: set[str] = set()
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#")[0].strip()
        if not line:
            continue
        if line.startswith("!"):
            left_out.add(canonicalize_name(line[1:].strip()))
            continue
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        if len(specifiers) != 1 or specifiers[0].operator != "==" or "*" in specifiers[0].version:
            raise ValueError(f"{path.name}:{number}: {line!r} is not an exact pin (name==version)")
        name = canonicalize_name(requirement.name)
        if name in pins:
            raise ValueError(f"{path.name}:{number}: {name} is pinned twice")
        pins[name] = specifiers[0].version
    return pins, left_out


def machine_packages(path: Path = MACHINE_FILE) -> set[str]:
    return {canonicalize_name(line.split("#")[0].strip()) for line in path.read_text().splitlines()
            if line.split("#")[0].strip()}


def requirements(metadata: str) -> list[Requirement]:
    """The requirements of a distribution that apply on the machine (no extras)."""
    found = [Requirement(text) for text in Parser().parsestr(metadata).get_all("Requires-Dist") or []]
    return [r for r in found if r.marker is None or r.marker.evaluate(MACHINE_MARKERS)]


def wheel_metadata(path: Path) -> str:
    with zipfile.ZipFile(path) as wheel:
        (name,) = [n for n in wheel.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        return wheel.read(name).decode()


def unmet(needs: dict[str, list[Requirement]], versions: dict[str, str], left_out: set[str],
          machine: set[str] = frozenset()) -> list[str]:
    """What is not met: ``needs`` (package -> its requirements) against ``versions`` (package ->
    version present); a package in ``machine`` counts as present in any version, one in
    ``left_out`` as not needed."""
    problems = []
    for package, reqs in sorted(needs.items()):
        for req in reqs:
            name = canonicalize_name(req.name)
            if name in versions:
                if not req.specifier.contains(versions[name], prereleases=True):
                    problems.append(f"{package} needs {req}, but {name} is {versions[name]}")
            elif name not in machine and name not in left_out:
                problems.append(f"{package} needs {req}: neither carried nor on the GPU machine")
    return problems


def check(directory: Path) -> list[str]:
    """Problems with the wheels in ``directory``: not those of wheelhouse.txt, or a requirement of
    one of them that no other wheel and no package of the machine meets."""
    pins, left_out = read_list()
    machine = machine_packages()
    wheels: dict[str, tuple[str, Path]] = {}
    problems = []
    for path in sorted(directory.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(path.name)
        if name in wheels:
            problems.append(f"two wheels of {name}: {wheels[name][1].name} and {path.name}")
        wheels[name] = (str(version), path)
    for name, version in pins.items():
        if name not in wheels:
            problems.append(f"no wheel of {name}=={version}")
        elif wheels[name][0] != version:
            problems.append(f"{wheels[name][1].name} is not the pinned {name}=={version}")
    problems += [f"{path.name} is not in {PINS_FILE.name}" for name, (_, path) in wheels.items() if name not in pins]
    shadowing = ((set(pins) | set(wheels)) & machine) - OVERRIDES  # listed or stray, it would be installed
    problems += [f"{name} is on the GPU machine already: carrying it would shadow the machine's" for name in sorted(shadowing)]
    needs = {name: requirements(wheel_metadata(path)) for name, (_, path) in wheels.items()}
    return problems + unmet(needs, {name: version for name, (version, _) in wheels.items()}, left_out, machine)


def write_idx_head(source: Path, dest: Path, count: int) -> None:
    """The first ``count`` items of an IDX file, as a gzip-compressed IDX file of their own."""
    from pipelines.data import IDX_UBYTE, read_idx

    head = read_idx(source)[0][:count]
    with gzip.GzipFile(dest, "wb", compresslevel=9, mtime=0) as out:
        out.write(bytes([0, 0, IDX_UBYTE, head.ndim]) + struct.pack(f">{head.ndim}I", *head.shape) + head.tobytes())


def write_data(source: Path, dest: Path, test_images: int = TEST_IMAGES) -> None:
    """Fashion-MNIST for the GPU checks in ``dest``: the training files as Debian ships them, the
    test set's first ``test_images``. pipelines.data reads them in place (CVAE_DATA_DIR=dest)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in TRAIN_FILES:
        shutil.copyfile(source / name, dest / name)
    for name in TEST_FILES:
        write_idx_head(source / name, dest / name, test_images)


def verify(target: str) -> list[str]:
    """On the machine, once the wheels are installed: each carried package is importable at its pin
    from ``target`` and every requirement of theirs is met by what this interpreter sees."""
    pins, left_out = read_list()
    problems, needs, versions = [], {}, {}
    for name, version in pins.items():
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{name} is not installed")
            continue
        if dist.version != version:
            problems.append(f"{name} is {dist.version}, not the pinned {version}")
        if target and not str(dist.locate_file("")).startswith(target):
            problems.append(f"{name} comes from {dist.locate_file('')}, not {target}")
        needs[name] = requirements(dist.read_text("METADATA") or "")
    for reqs in needs.values():
        for req in reqs:
            try:
                versions[canonicalize_name(req.name)] = importlib.metadata.version(req.name)
            except importlib.metadata.PackageNotFoundError:
                pass
    return problems + unmet(needs, versions, left_out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check", help="the wheels in DIR are those of wheelhouse.txt, and closed").add_argument("dir")
    data = commands.add_parser("data", help="write the Fashion-MNIST files the GPU checks read")
    data.add_argument("source", help="a folder with Fashion-MNIST's four .gz files")
    data.add_argument("dest")
    data.add_argument("--test-images", type=int, default=TEST_IMAGES)
    verify_parser = commands.add_parser("verify", help="on the machine: the installed wheels' requirements are met")
    verify_parser.add_argument("--target", default="", help="where the wheels were installed (pip --target)")
    args = parser.parse_args(argv)
    if args.command == "data":
        write_data(Path(args.source), Path(args.dest), args.test_images)
        return 0
    problems = check(Path(args.dir)) if args.command == "check" else verify(args.target)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        print(f"{args.command}: the {len(read_list()[0])} wheels of {PINS_FILE.name} are complete")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
