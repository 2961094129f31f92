"""mast3r_slam_ros: MASt3R-SLAM (dense monocular SLAM, CVPR 2025) as a single-process ROS 2 package.

Layers (see DESIGN in the repository docs): ``lie`` / ``geometry`` -> ``network`` -> ``kernels`` -> ``slam`` -> ``io``
-> ``ros``. Only ``mast3r_slam_ros.ros`` imports rclpy.
"""

__version__ = "0.1.0"
