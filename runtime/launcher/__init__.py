"""helmstack's launcher: run the nodes of a ROS 2 YAML launch file without the ROS 2 launch system.

`load_launch_file` turns a launch file (a documented subset of the launch_yaml syntax,
see runtime.launcher.description) into a LaunchPlan; `NodeProcessGroup` starts its nodes
as processes and stops them again. The same file works unchanged with `ros2 launch`.
"""
from runtime.launcher.description import (
    LaunchArgumentError,
    LaunchFileError,
    LaunchPlan,
    NodeAction,
    load_launch_file,
    parse_launch_arguments,
)
from runtime.launcher.packages import PackageNotFoundError, ament_prefixes, find_package_share
from runtime.launcher.processes import (
    ExecutableNotFoundError,
    NodeProcessGroup,
    NodeStartError,
    resolve_executable,
    ros_args,
)

__all__ = [
    "ExecutableNotFoundError",
    "LaunchArgumentError",
    "LaunchFileError",
    "LaunchPlan",
    "NodeAction",
    "NodeProcessGroup",
    "NodeStartError",
    "PackageNotFoundError",
    "ament_prefixes",
    "find_package_share",
    "load_launch_file",
    "parse_launch_arguments",
    "resolve_executable",
    "ros_args",
]
