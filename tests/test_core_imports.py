"""Rule 1: algorithm code never imports rclpy or message packages. Import every core module
in a fresh interpreter where those imports fail."""
import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE_PACKAGES = ["runtime", "policies", "perception", "sim", "real", "training"]
ROS_SIDE = ("runtime.nodes",)  # the node modules and message converters
ROS_MODULES = ["rclpy", "sensor_msgs", "std_msgs", "geometry_msgs", "trajectory_msgs", "helmstack_interfaces",
               "diagnostic_msgs", "rosgraph_msgs"]


def core_modules() -> list[str]:
    names = []
    for pkg in CORE_PACKAGES:
        names.append(pkg)
        for info in pkgutil.walk_packages([str(ROOT / pkg)], prefix=f"{pkg}."):
            if not info.name.startswith(ROS_SIDE):
                names.append(info.name)
    return names


def test_core_modules_import_without_ros():
    modules = core_modules()
    assert "sim.backend" in modules and "real.safety" in modules
    blocker = (
        "import sys, importlib.abc\n"
        f"BLOCKED = {ROS_MODULES!r}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError(f'{name} imported by a core module')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import importlib\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "print('ok', len(sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", blocker], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
