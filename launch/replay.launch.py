"""Play a rosbag2 into the mast3r_slam node with RViz (sim time from the bag's /clock).

    ros2 launch mast3r_slam_ros replay.launch.py bag:=/data/tum_fr1_desk checkpoint:=/path/model.pth

Arguments: bag, rate, image_topic, camera_info_topic, checkpoint, device, params_file, rviz. Without the ros2 CLI
(pip installs, Windows without rosbag2) use ``mast3r-slam-ros replay <bag>`` instead of ``ros2 bag play``.
The node runs with ``frame_policy: all`` so every bag frame is processed.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare


def generate_launch_description():
    share = FindPackageShare("mast3r_slam_ros")
    args = [
        DeclareLaunchArgument("bag", description="rosbag2 directory to play"),
        DeclareLaunchArgument("rate", default_value="1.0", description="playback rate"),
        DeclareLaunchArgument("image_topic", default_value="/camera/image_raw", description="image topic in the bag"),
        DeclareLaunchArgument("camera_info_topic", default_value="/camera/camera_info",
                              description="camera_info topic in the bag"),
        DeclareLaunchArgument("checkpoint", default_value="", description="MASt3R checkpoint file or repo id"),
        DeclareLaunchArgument("device", default_value="auto", description="torch device"),
        DeclareLaunchArgument("params_file", default_value=PathJoinSubstitution([share, "config", "mast3r_slam.yaml"]),
                              description="node parameter file"),
        DeclareLaunchArgument("rviz", default_value="true", description="start RViz"),
    ]
    play = ExecuteProcess(
        cmd=["ros2", "bag", "play", LaunchConfiguration("bag"), "--rate", LaunchConfiguration("rate"), "--clock"],
        output="screen",
    )
    slam = Node(
        package="mast3r_slam_ros",
        executable="slam_node",
        name="mast3r_slam",
        output="screen",
        parameters=[
            LaunchConfiguration("params_file"),
            {
                "checkpoint": LaunchConfiguration("checkpoint"),
                "device": LaunchConfiguration("device"),
                "frame_policy": "all",
                "image_qos": "reliable",
                "image_queue_size": 100,
                "use_sim_time": True,
            },
        ],
        remappings=[
            ("image", LaunchConfiguration("image_topic")),
            ("camera_info", LaunchConfiguration("camera_info_topic")),
        ],
    )
    rviz = Node(
        package="rviz2",
        executable="rviz2",
        name="rviz2",
        arguments=["-d", PathJoinSubstitution([share, "rviz", "mast3r_slam.rviz"])],
        parameters=[{"use_sim_time": True}],
        condition=IfCondition(LaunchConfiguration("rviz")),
    )
    return LaunchDescription([*args, slam, rviz, play])
