// pybind11 bindings of the mast3r_slam_ros._cuda extension. Python callers: mast3r_slam_ros/kernels/__init__.py.
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "mast3r_slam_ros CUDA kernels: iter_proj, refine_matches, per-edge Gauss-Newton sums, tracking normal "
      "equations";
  m.def("iter_proj", &mast3r_slam_ros::iter_proj_cuda, "iterative projective matching (spec 4.2)",
        pybind11::arg("rays_with_grad"), pybind11::arg("pts3d_norm"), pybind11::arg("p_init"),
        pybind11::arg("max_iter"), pybind11::arg("lambda_init"), pybind11::arg("cost_thresh"));
  m.def("refine_matches", &mast3r_slam_ros::refine_matches_cuda, "dilated descriptor refinement (spec 4.4)",
        pybind11::arg("D11"), pybind11::arg("D21"), pybind11::arg("p1"), pybind11::arg("radius"),
        pybind11::arg("dilation_max"));
  m.def("gn_rays_blocks", &mast3r_slam_ros::gn_rays_blocks_cuda, "per-edge GN sums, ray+dist residual (spec 6.4)");
  m.def("gn_calib_blocks", &mast3r_slam_ros::gn_calib_blocks_cuda,
        "per-edge GN sums, pixel+log-depth residual (spec 6.5)");
  m.def("gn_points_blocks", &mast3r_slam_ros::gn_points_blocks_cuda, "per-edge GN sums, 3-D point residual (6.6)");
  m.def("track_system_rays", &mast3r_slam_ros::track_system_rays_cuda,
        "tracking normal equations, ray+dist residual (spec 5.2), packed [58] f64", pybind11::arg("T"),
        pybind11::arg("Xf"), pybind11::arg("Xk"), pybind11::arg("sqrt_info"), pybind11::arg("huber"));
  m.def("track_system_calib", &mast3r_slam_ros::track_system_calib_cuda,
        "tracking normal equations, pixel+log-depth residual (spec 5.3), packed [58] f64", pybind11::arg("T"),
        pybind11::arg("Xf"), pybind11::arg("meas_k"), pybind11::arg("static"), pybind11::arg("sq"),
        pybind11::arg("base"), pybind11::arg("K"), pybind11::arg("height"), pybind11::arg("width"),
        pybind11::arg("pixel_border"), pybind11::arg("z_eps"), pybind11::arg("huber"));
  m.def("rope_apply", &mast3r_slam_ros::rope_apply_cuda, "fused 2-D RoPE rotation (mast3r_network.md 3.2)",
        pybind11::arg("x"), pybind11::arg("cos"), pybind11::arg("sin"));
}
