"""Launch the mast3r_slam node (+ RViz).

    ros2 launch mast3r_slam_ros mast3r_slam.launch.py image_topic:=/camera/color/image_raw \
        camera_info_topic:=/camera/color/camera_info checkpoint:=/path/MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric.pth

Arguments: image_topic, camera_info_topic, checkpoint, device, params_file (default: the package's
config/mast3r_slam.yaml), use_sim_time, rviz. Topics, parameters and frames: docs/ros.md.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare


def generate_launch_description():
    share = FindPackageShare("mast3r_slam_ros")
    args = [
        DeclareLaunchArgument("image_topic", default_value="/camera/image_raw",
                              description="sensor_msgs/Image input (remapped to the node's 'image')"),
        DeclareLaunchArgument("camera_info_topic", default_value="/camera/camera_info",
                              description="sensor_msgs/CameraInfo input (remapped to the node's 'camera_info')"),
        DeclareLaunchArgument("checkpoint", default_value="",
                              description="MASt3R checkpoint file or Hugging Face repo id (node parameter 'checkpoint')"),
        DeclareLaunchArgument("device", default_value="auto", description="torch device: auto, cuda, cuda:N or cpu"),
        DeclareLaunchArgument("params_file", default_value=PathJoinSubstitution([share, "config", "mast3r_slam.yaml"]),
                              description="node parameter file"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="use /clock (bag playback)"),
        DeclareLaunchArgument("rviz", default_value="true", description="start RViz with rviz/mast3r_slam.rviz"),
    ]
    slam = Node(
        package="mast3r_slam_ros",
        executable="slam_node",
        name="mast3r_slam",
        output="screen",
        emulate_tty=True,
        parameters=[
            LaunchConfiguration("params_file"),
            {
                "checkpoint": LaunchConfiguration("checkpoint"),
                "device": LaunchConfiguration("device"),
                "use_sim_time": LaunchConfiguration("use_sim_time"),
            },
        ],
        remappings=[
            ("image", LaunchConfiguration("image_topic")),
            ("image/compressed", [LaunchConfiguration("image_topic"), "/compressed"]),
            ("camera_info", LaunchConfiguration("camera_info_topic")),
        ],
    )
    rviz = Node(
        package="rviz2",
        executable="rviz2",
        name="rviz2",
        arguments=["-d", PathJoinSubstitution([share, "rviz", "mast3r_slam.rviz"])],
        parameters=[{"use_sim_time": LaunchConfiguration("use_sim_time")}],
        condition=IfCondition(LaunchConfiguration("rviz")),
    )
    return LaunchDescription([*args, slam, rviz])
