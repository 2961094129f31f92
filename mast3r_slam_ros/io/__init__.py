"""io layer of mast3r_slam_ros."""
