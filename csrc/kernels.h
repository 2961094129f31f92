// Host entry points of the mast3r_slam_ros._cuda extension (definitions in matching_kernels.cu, gn_kernels.cu,
// track_kernels.cu, rope_kernels.cu).
//
// Semantics: spec upstream_algorithm.md §4.2 (iter_proj), §4.4 (refine_matches), §6.4-§6.6 (per-edge GN blocks),
// §5.2-§5.4 (tracking normal equations).
// The Python layer (mast3r_slam_ros/kernels/__init__.py) validates arguments too; these functions check again with
// TORCH_CHECK (device, dtype, contiguity, shapes) because they can be called directly.
// MSVC-safe: int64_t for 64-bit integers (MSVC is LLP64), constexpr sizes, no VLAs, no GCC builtins.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <string>
#include <vector>

namespace mast3r_slam_ros {

// rays_with_grad [B,H,W,9] f32, pts3d_norm [B,HW,3] f32, p_init [B,HW,2] f32 -> {p [B,HW,2] f32, converged [B,HW] bool}
std::vector<torch::Tensor> iter_proj_cuda(const torch::Tensor& rays_with_grad, const torch::Tensor& pts3d_norm,
                                          const torch::Tensor& p_init, int64_t max_iter, double lambda_init,
                                          double cost_thresh);

// D11 [B,H,W,F] f16|f32|f64, D21 [B,HW,F] same dtype, p1 [B,HW,2] i64 -> p1_new [B,HW,2] i64
torch::Tensor refine_matches_cuda(const torch::Tensor& D11, const torch::Tensor& D21, const torch::Tensor& p1,
                                  int64_t radius, int64_t dilation_max);

// Per-edge sums for the global Gauss-Newton. Tij [2E,8] f32 (relative poses T_i^-1 T_j, lietorch layout),
// Xs [n,HW,3] f32, Cs [n,HW,1] f32, ii/jj [2E] i64, idx [2E,HW] i64, valid [2E,HW,1] bool, Q [2E,HW,1] f32.
// Returns sums [2E,36] f64: 28 upper-triangular entries of Hr = sum Jr^T W Jr (row-major, a <= b), 7 entries of
// gr = sum Jr^T W r, and the robust cost sum rho(sqrt(w0) r).
torch::Tensor gn_rays_blocks_cuda(const torch::Tensor& Tij, const torch::Tensor& Xs, const torch::Tensor& Cs,
                                  const torch::Tensor& ii, const torch::Tensor& jj, const torch::Tensor& idx,
                                  const torch::Tensor& valid, const torch::Tensor& Q, double sigma_ray,
                                  double sigma_dist, double C_thresh, double Q_thresh);

torch::Tensor gn_calib_blocks_cuda(const torch::Tensor& Tij, const torch::Tensor& Xs, const torch::Tensor& Cs,
                                   const torch::Tensor& K, const torch::Tensor& ii, const torch::Tensor& jj,
                                   const torch::Tensor& idx, const torch::Tensor& valid, const torch::Tensor& Q,
                                   int64_t height, int64_t width, int64_t pixel_border, double z_eps,
                                   double sigma_pixel, double sigma_depth, double C_thresh, double Q_thresh);

torch::Tensor gn_points_blocks_cuda(const torch::Tensor& Tij, const torch::Tensor& Xs, const torch::Tensor& Cs,
                                    const torch::Tensor& ii, const torch::Tensor& jj, const torch::Tensor& idx,
                                    const torch::Tensor& valid, const torch::Tensor& Q, double sigma_point,
                                    double C_thresh, double Q_thresh);

// Tracking (frame -> keyframe) IRLS normal equations at the pose T [1,8] f32 (lietorch layout), reduced on the device
// without host synchronization. Returns [58] f64: H = A^T A (49, row-major), A^T b (7), b^T b (1), number of pixels
// with non-zero information (1). Reference: mast3r_slam_ros/kernels/track_torch.py.
// Ray + distance: Xf, Xk [N,3] f32, sqrt_info [N,4] f32.
torch::Tensor track_system_rays_cuda(const torch::Tensor& T, const torch::Tensor& Xf, const torch::Tensor& Xk,
                                     const torch::Tensor& sqrt_info, double huber);

// Pixel + log-depth: Xf [N,3] f32, meas_k [N,3] f32 (u, v, log z), valid_static [N,1] bool, sq [N,1] f32 (sqrt Q),
// base [3] f32 (1/sigma), K [3,3] f32 (read on the device), image height x width, pixel_border, z_eps.
torch::Tensor track_system_calib_cuda(const torch::Tensor& T, const torch::Tensor& Xf, const torch::Tensor& meas_k,
                                      const torch::Tensor& valid_static, const torch::Tensor& sq,
                                      const torch::Tensor& base, const torch::Tensor& K, int64_t height,
                                      int64_t width, double pixel_border, double z_eps, double huber);

// Fused 2-D RoPE: x [L,B,H,N,D] f32|f16|bf16 (strided, last dim contiguous), cos/sin [1 or B,1,N,D] f32 (sign folded
// into sin) -> rotated tokens [L,B,H,N,D] contiguous in x's dtype. Reference: network/rope.py RoPE2D.apply.
torch::Tensor rope_apply_cuda(const torch::Tensor& x, const torch::Tensor& cos_t, const torch::Tensor& sin_t);

}  // namespace mast3r_slam_ros

// Input checks shared by the .cu files.
#define M3R_CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor")
#define M3R_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define M3R_CHECK_DTYPE(x, dt) \
  TORCH_CHECK((x).scalar_type() == (dt), #x " must have dtype " #dt ", got ", (x).scalar_type())
#define M3R_CHECK_INPUT(x, dt) \
  M3R_CHECK_CUDA(x);           \
  M3R_CHECK_CONTIGUOUS(x);     \
  M3R_CHECK_DTYPE(x, dt)

// Error-message formatting without std::ostream for integers. Seen on torch 2.11 + nvcc 13 (H200): a TORCH_CHECK in a
// .cu file whose message streams an int64_t (directly or through Tensor::sizes()) segfaults when it throws, while
// messages streaming only strings and ScalarTypes work. std::to_string avoids the integer ostream path.
namespace mast3r_slam_ros {
inline std::string m3r_int(int64_t v) { return std::to_string(v); }
inline std::string m3r_shape(const torch::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (d > 0) s += ", ";
    s += std::to_string(t.size(d));
  }
  return s + "]";
}
}  // namespace mast3r_slam_ros
