"""Thin ROS 2 nodes over the helmstack cores; the only place (with msg_convert) that imports rclpy."""
