// CUDA kernels for projective matching (spec upstream_algorithm.md §4.2 iter_proj, §4.4 refine_matches).
// Same semantics as mast3r_slam_ros/kernels/matching_torch.py (the reference in the tests).
#include "kernels.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <limits>

namespace mast3r_slam_ros {
namespace {

constexpr int kThreads = 128;
constexpr int kChannels = 9;
constexpr int64_t kMaxFeat = 64;  // descriptor length bound (SLAM uses 24); local arrays need a constant size

// Bilinear 4-tap sample of all 9 channels at (u, v); the caller guarantees 0 <= u0 < W-1, 0 <= v0 < H-1.
__device__ __forceinline__ void sample9(const float* __restrict__ img, int64_t W, float u, float v,
                                        float out[kChannels]) {
  const float u0f = floorf(u);
  const float v0f = floorf(v);
  const float du = u - u0f;
  const float dv = v - v0f;
  const int64_t i00 = (static_cast<int64_t>(v0f) * W + static_cast<int64_t>(u0f)) * kChannels;
  const int64_t i01 = i00 + kChannels;
  const int64_t i10 = i00 + W * kChannels;
  const int64_t i11 = i10 + kChannels;
  const float w00 = (1.f - du) * (1.f - dv);
  const float w01 = du * (1.f - dv);
  const float w10 = (1.f - du) * dv;
  const float w11 = du * dv;
#pragma unroll
  for (int c = 0; c < kChannels; ++c) {
    out[c] = w00 * img[i00 + c] + w01 * img[i01 + c] + w10 * img[i10 + c] + w11 * img[i11 + c];
  }
}

__device__ __forceinline__ void unit3(const float a[3], float r[3]) {
  const float n = fmaxf(sqrtf(a[0] * a[0] + a[1] * a[1] + a[2] * a[2]), 1e-12f);
  r[0] = a[0] / n;
  r[1] = a[1] / n;
  r[2] = a[2] / n;
}

__device__ __forceinline__ float clampf(float x, float lo, float hi) { return fminf(fmaxf(x, lo), hi); }

__global__ void iter_proj_kernel(const float* __restrict__ rays, const float* __restrict__ pts,
                                 const float* __restrict__ p_init, float* __restrict__ p_out,
                                 bool* __restrict__ converged, int64_t H, int64_t W, int64_t max_iter,
                                 float lambda_init, float cost_thresh) {
  const int64_t HW = H * W;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (n >= HW) return;  // HW need not be a multiple of the block size
  const float* img = rays + b * HW * kChannels;
  const int64_t pix = b * HW + n;
  const float umax = static_cast<float>(W - 2);
  const float vmax = static_cast<float>(H - 2);
  // NaN initial positions clamp to the lower bound (fmaxf ignores NaN)
  float u = clampf(p_init[pix * 2 + 0], 1.f, umax);
  float v = clampf(p_init[pix * 2 + 1], 1.f, vmax);
  const float t[3] = {pts[pix * 3 + 0], pts[pix * 3 + 1], pts[pix * 3 + 2]};
  float lambda = lambda_init;
  bool conv = false;
  float val[kChannels];
  float r[3];
  for (int64_t it = 0; it < max_iter; ++it) {
    sample9(img, W, u, v, val);
    unit3(val, r);
    const float* gx = val + 3;
    const float* gy = val + 6;
    const float e0 = r[0] - t[0], e1 = r[1] - t[1], e2 = r[2] - t[2];
    const float c = e0 * e0 + e1 * e1 + e2 * e2;
    const float a00 = gx[0] * gx[0] + gx[1] * gx[1] + gx[2] * gx[2] + lambda;
    const float a01 = gx[0] * gy[0] + gx[1] * gy[1] + gx[2] * gy[2];
    const float a11 = gy[0] * gy[0] + gy[1] * gy[1] + gy[2] * gy[2] + lambda;
    const float b0 = -(e0 * gx[0] + e1 * gx[1] + e2 * gx[2]);
    const float b1 = -(e0 * gy[0] + e1 * gy[1] + e2 * gy[2]);
    const float det = a00 * a11 - a01 * a01;
    // guard (deviation from upstream): a non-positive / non-finite determinant gives a zero (then rejected) step
    const float det_inv = (det > 0.f && isfinite(det)) ? 1.f / det : 0.f;
    const float du = det_inv * (a11 * b0 - a01 * b1);
    const float dv = det_inv * (-a01 * b0 + a00 * b1);
    const float un = clampf(u + du, 1.f, umax);
    const float vn = clampf(v + dv, 1.f, vmax);
    sample9(img, W, un, vn, val);
    unit3(val, r);
    const float f0 = r[0] - t[0], f1 = r[1] - t[1], f2 = r[2] - t[2];
    const float cn = f0 * f0 + f1 * f1 + f2 * f2;
    if (cn < c) {
      u = un;
      v = vn;
      lambda *= 0.1f;
      conv = cn < cost_thresh;
    } else {
      lambda *= 10.f;
      conv = c < cost_thresh;
    }
  }
  p_out[pix * 2 + 0] = u;
  p_out[pix * 2 + 1] = v;
  converged[pix] = conv;
}

// Accumulator type and correctly rounded (never contracted to FMA) multiply / add, so that the scores equal the
// PyTorch implementation's sequential s = s + a*b bit for bit.
template <typename scalar_t>
struct Acc {
  using type = float;
  __device__ static float load(scalar_t x) { return static_cast<float>(x); }
  __device__ static float mul(float a, float b) { return __fmul_rn(a, b); }
  __device__ static float add(float a, float b) { return __fadd_rn(a, b); }
};

template <>
struct Acc<double> {
  using type = double;
  __device__ static double load(double x) { return x; }
  __device__ static double mul(double a, double b) { return __dmul_rn(a, b); }
  __device__ static double add(double a, double b) { return __dadd_rn(a, b); }
};

template <>
struct Acc<c10::Half> {
  using type = float;
  __device__ static float load(c10::Half x) { return __half2float(static_cast<__half>(x)); }
  __device__ static float mul(float a, float b) { return __fmul_rn(a, b); }  // exact for half inputs
  __device__ static float add(float a, float b) { return __fadd_rn(a, b); }
};

template <typename scalar_t>
__global__ void refine_matches_kernel(const scalar_t* __restrict__ D11, const scalar_t* __restrict__ D21,
                                      const int64_t* __restrict__ p1, int64_t* __restrict__ p1_out, int64_t H,
                                      int64_t W, int64_t F, int64_t radius, int64_t dilation_max,
                                      typename Acc<scalar_t>::type best_init) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t HW = H * W;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (n >= HW) return;
  const int64_t pix = b * HW + n;
  acc_t q[kMaxFeat];
  for (int64_t k = 0; k < F; ++k) q[k] = Acc<scalar_t>::load(D21[pix * F + k]);
  const scalar_t* img = D11 + b * HW * F;
  int64_t u0 = p1[pix * 2 + 0];
  int64_t v0 = p1[pix * 2 + 1];
  int64_t ub = u0, vb = v0;
  acc_t best = best_init;  // not reset between levels (upstream)
  for (int64_t d = dilation_max; d >= 1; --d) {
    for (int64_t i = -radius; i <= radius; ++i) {  // u offset outer
      const int64_t u = u0 + i * d;
      if (u < 0 || u >= W) continue;
      for (int64_t j = -radius; j <= radius; ++j) {  // v offset inner
        const int64_t v = v0 + j * d;
        if (v < 0 || v >= H) continue;
        const scalar_t* c = img + (v * W + u) * F;
        acc_t s = Acc<scalar_t>::mul(Acc<scalar_t>::load(c[0]), q[0]);
        for (int64_t k = 1; k < F; ++k) s = Acc<scalar_t>::add(s, Acc<scalar_t>::mul(Acc<scalar_t>::load(c[k]), q[k]));
        if (s > best) {  // strict: ties keep the first candidate visited; NaN never wins
          best = s;
          ub = u;
          vb = v;
        }
      }
    }
    u0 = ub;
    v0 = vb;
  }
  p1_out[pix * 2 + 0] = ub;
  p1_out[pix * 2 + 1] = vb;
}

}  // namespace

std::vector<torch::Tensor> iter_proj_cuda(const torch::Tensor& rays_with_grad, const torch::Tensor& pts3d_norm,
                                          const torch::Tensor& p_init, int64_t max_iter, double lambda_init,
                                          double cost_thresh) {
  M3R_CHECK_INPUT(rays_with_grad, torch::kFloat32);
  M3R_CHECK_INPUT(pts3d_norm, torch::kFloat32);
  M3R_CHECK_INPUT(p_init, torch::kFloat32);
  TORCH_CHECK(rays_with_grad.dim() == 4 && rays_with_grad.size(3) == kChannels,
              "rays_with_grad must be [B,H,W,9], got ", m3r_shape(rays_with_grad));
  const int64_t B = rays_with_grad.size(0), H = rays_with_grad.size(1), W = rays_with_grad.size(2);
  TORCH_CHECK(H >= 3 && W >= 3, "iter_proj needs H, W >= 3, got ", m3r_int(H), "x", m3r_int(W));
  TORCH_CHECK(pts3d_norm.dim() == 3 && pts3d_norm.size(0) == B && pts3d_norm.size(1) == H * W &&
                  pts3d_norm.size(2) == 3,
              "pts3d_norm must be [B,HW,3] = [", m3r_int(B), ",", m3r_int(H * W), ",3], got ", m3r_shape(pts3d_norm));
  TORCH_CHECK(p_init.dim() == 3 && p_init.size(0) == B && p_init.size(1) == H * W && p_init.size(2) == 2,
              "p_init must be [B,HW,2], got ", m3r_shape(p_init));
  TORCH_CHECK(pts3d_norm.device() == rays_with_grad.device() && p_init.device() == rays_with_grad.device(),
              "all inputs must be on the same device");
  TORCH_CHECK(max_iter >= 0, "max_iter must be >= 0");
  TORCH_CHECK(B <= 65535, "batch too large for grid.y: ", m3r_int(B));
  const c10::cuda::CUDAGuard guard(rays_with_grad.device());
  auto p_out = torch::empty_like(p_init);
  auto conv = torch::empty({B, H * W}, p_init.options().dtype(torch::kBool));
  if (B == 0 || H * W == 0) return {p_out, conv};
  const dim3 grid(static_cast<unsigned int>((H * W + kThreads - 1) / kThreads), static_cast<unsigned int>(B));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  iter_proj_kernel<<<grid, kThreads, 0, stream>>>(rays_with_grad.data_ptr<float>(), pts3d_norm.data_ptr<float>(),
                                                  p_init.data_ptr<float>(), p_out.data_ptr<float>(),
                                                  conv.data_ptr<bool>(), H, W, max_iter,
                                                  static_cast<float>(lambda_init), static_cast<float>(cost_thresh));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {p_out, conv};
}

torch::Tensor refine_matches_cuda(const torch::Tensor& D11, const torch::Tensor& D21, const torch::Tensor& p1,
                                  int64_t radius, int64_t dilation_max) {
  M3R_CHECK_CUDA(D11);
  M3R_CHECK_CONTIGUOUS(D11);
  M3R_CHECK_CUDA(D21);
  M3R_CHECK_CONTIGUOUS(D21);
  M3R_CHECK_INPUT(p1, torch::kInt64);
  const auto st = D11.scalar_type();
  TORCH_CHECK(st == torch::kFloat16 || st == torch::kFloat32 || st == torch::kFloat64,
              "D11 must be float16, float32 or float64, got ", st);
  TORCH_CHECK(D21.scalar_type() == st, "D21 must have the dtype of D11 (", st, "), got ", D21.scalar_type());
  TORCH_CHECK(D11.dim() == 4, "D11 must be [B,H,W,F], got ", m3r_shape(D11));
  const int64_t B = D11.size(0), H = D11.size(1), W = D11.size(2), F = D11.size(3);
  TORCH_CHECK(F >= 1 && F <= kMaxFeat, "descriptor length must be in [1, ", m3r_int(kMaxFeat), "], got ", m3r_int(F));
  TORCH_CHECK(D21.dim() == 3 && D21.size(0) == B && D21.size(1) == H * W && D21.size(2) == F,
              "D21 must be [B,HW,F], got ", m3r_shape(D21));
  TORCH_CHECK(p1.dim() == 3 && p1.size(0) == B && p1.size(1) == H * W && p1.size(2) == 2,
              "p1 must be [B,HW,2], got ", m3r_shape(p1));
  TORCH_CHECK(D21.device() == D11.device() && p1.device() == D11.device(), "all inputs must be on the same device");
  TORCH_CHECK(radius >= 0 && dilation_max >= 1, "need radius >= 0 and dilation_max >= 1");
  TORCH_CHECK(B <= 65535, "batch too large for grid.y: ", m3r_int(B));
  const c10::cuda::CUDAGuard guard(D11.device());
  auto out = torch::empty_like(p1);
  if (B == 0 || H * W == 0) return out;
  const dim3 grid(static_cast<unsigned int>((H * W + kThreads - 1) / kThreads), static_cast<unsigned int>(B));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(st, "refine_matches_cuda", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    // initial best: 0 for half (upstream numeric_limits<Half>::min() is value-initialized), else the smallest
    // positive normal of the accumulation type (FLT_MIN / DBL_MIN), as in matching_torch.refine_initial_best
    const acc_t best_init = (st == torch::kFloat16) ? acc_t(0) : std::numeric_limits<acc_t>::min();
    refine_matches_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        D11.data_ptr<scalar_t>(), D21.data_ptr<scalar_t>(), p1.data_ptr<int64_t>(), out.data_ptr<int64_t>(), H, W,
        F, radius, dilation_max, best_init);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace mast3r_slam_ros
