"""Simulated sensors on pybullet: pinhole camera, LiDAR, event camera, tactile pads.

Core modules: numpy and pybullet only, every sensor bound to one pybullet
client id so several simulations can share a process.
"""

from sim.sensors.camera import Camera, CameraConfig, CameraFrame, intrinsics, look_at
from sim.sensors.event_camera import EventCameraConfig, EventCameraSimulator, EventPacket
from sim.sensors.lidar import Lidar, LidarConfig, LidarScan
from sim.sensors.tactile import TactileConfig, TactileSensor, panda_finger_pads

__all__ = [
    "Camera",
    "CameraConfig",
    "CameraFrame",
    "EventCameraConfig",
    "EventCameraSimulator",
    "EventPacket",
    "Lidar",
    "LidarConfig",
    "LidarScan",
    "TactileConfig",
    "TactileSensor",
    "intrinsics",
    "look_at",
    "panda_finger_pads",
]
