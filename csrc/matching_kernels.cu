// CUDA kernels for projective matching (spec upstream_algorithm.md §4.2 iter_proj, §4.4 refine_matches).
// Same semantics as mast3r_slam_ros/kernels/matching_torch.py (the reference in the tests).
#include "kernels.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
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

// ---------------------------------------------------------------------------------------------------------------
// Fast path of refine_matches: F == kRefineFastF descriptors (half or float), rows read as 16-byte vectors.
//
// Same results as refine_matches_kernel bit for bit: same visiting order (level d = dilation_max..1, u offset outer,
// v offset inner), same score s = ((c0*q0 + c1*q1) + c2*q2) + ... with separately rounded __fmul_rn / __fadd_rn in
// float (half -> float conversion is exact, products of halves are exact in float), same strict '>' against the
// running best (starting at best_init, not reset between levels), same skipping of out-of-image candidates.
// What differs is only how the data is read: one 16-byte __ldg per 8 halves (4 floats) instead of one scalar load
// per element, the query held in registers as float, int32 index math, and (radius 3, the SLAM setting, as a
// compile-time constant) the 7 candidates of a column loaded and scored without branches before the in-order
// comparisons. H200, 512x384, fp16, r=3, d=5, B=1: 0.54-0.71 ms vs 1.77-2.11 ms for refine_matches_kernel (coherent /
// random start pixels); B=8: 4.0-5.3 ms vs 13.4-16.3 ms. The host selects it only when
//   * the row length is kRefineFastF and D11 / D21 start on a 16-byte boundary (rows are 48 / 96 bytes, so every row
//     is aligned then),
//   * B*H*W*F < 2^31 (every element index fits in int32) and radius*dilation_max + max(H, W) < 2^30,
// and falls back to the generic kernel otherwise.
// Start positions p1 are int64 and may lie anywhere: a start farther than radius*dilation_max outside the image has no
// in-image candidate at any level (the centre only moves to a winning, in-image candidate), so such pixels keep their
// start, exactly as in the generic kernel, and every other start fits in int32.
constexpr int kRefineFastF = 24;

// One 16-byte word of descriptors -> kElems floats (exact conversion).
template <typename scalar_t>
struct Vec16;

template <>
struct Vec16<c10::Half> {
  static constexpr int kElems = 8;
  __device__ __forceinline__ static void unpack(const uint4& w, float* out) {
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h2;
      memcpy(&h2, &words[i], sizeof(h2));  // bit copy (no aliasing cast)
      const float2 f = __half22float2(h2);  // low half = element 2i (little-endian memory order)
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
};

template <>
struct Vec16<float> {
  static constexpr int kElems = 4;
  __device__ __forceinline__ static void unpack(const uint4& w, float* out) {
    out[0] = __uint_as_float(w.x);
    out[1] = __uint_as_float(w.y);
    out[2] = __uint_as_float(w.z);
    out[3] = __uint_as_float(w.w);
  }
};

// Dot product of one 16-byte-word row with the query: s = c0*q0, then s = s + ck*qk for k = 1..kF-1 (separately
// rounded, never contracted to FMA).
template <typename scalar_t, int kWords>
__device__ __forceinline__ float dot_row(const uint4 (&raw)[kWords], const float* q) {
  constexpr int kPer = Vec16<scalar_t>::kElems;
  float s = 0.f;
#pragma unroll
  for (int w = 0; w < kWords; ++w) {
    float c[kPer];
    Vec16<scalar_t>::unpack(raw[w], c);
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      const float prod = __fmul_rn(c[e], q[w * kPer + e]);
      s = (w == 0 && e == 0) ? prod : __fadd_rn(s, prod);
    }
  }
  return s;
}

// kRadius >= 0: the radius is a compile-time constant (the 2r+1 candidates of one column are unrolled, their loads and
// dot products independent, the comparisons still in visiting order); kRadius < 0: the runtime `radius`.
template <typename scalar_t, int kF, int kRadius>
__global__ void __launch_bounds__(kThreads)
    refine_matches_vec_kernel(const uint4* __restrict__ D11, const uint4* __restrict__ D21,
                              const int64_t* __restrict__ p1, int64_t* __restrict__ p1_out, int H, int W, int HW,
                              int radius_rt, int dilation_max, float best_init) {
  constexpr int kPer = Vec16<scalar_t>::kElems;
  static_assert(kF % kPer == 0, "row length must be a whole number of 16-byte words");
  constexpr int kWords = kF / kPer;  // 16-byte words per descriptor row
  const int radius = kRadius >= 0 ? kRadius : radius_rt;
  const int n = static_cast<int>(blockIdx.x) * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x);
  const int b = static_cast<int>(blockIdx.y);
  if (n >= HW) return;
  const int pix = b * HW + n;
  float q[kF];
#pragma unroll
  for (int w = 0; w < kWords; ++w) Vec16<scalar_t>::unpack(__ldg(D21 + pix * kWords + w), q + w * kPer);
  const uint4* img = D11 + b * HW * kWords;
  const int64_t u_in = p1[2 * pix + 0];
  const int64_t v_in = p1[2 * pix + 1];
  const int64_t reach = static_cast<int64_t>(radius) * dilation_max;
  if (u_in < -reach || u_in >= W + reach || v_in < -reach || v_in >= H + reach) {
    p1_out[2 * pix + 0] = u_in;  // no candidate of any level is inside the image
    p1_out[2 * pix + 1] = v_in;
    return;
  }
  int u0 = static_cast<int>(u_in);
  int v0 = static_cast<int>(v_in);
  int ub = u0, vb = v0;
  float best = best_init;  // not reset between levels (upstream)
  for (int d = dilation_max; d >= 1; --d) {
    for (int i = -radius; i <= radius; ++i) {  // u offset outer
      const int u = u0 + i * d;
      if (u < 0 || u >= W) continue;
      const uint4* col = img + u * kWords;
      // v offset inner. An out-of-image candidate is read at a clamped (in-image) row and its score discarded, so
      // the loop has no data-dependent branch and all loads of a column can be in flight together.
#pragma unroll
      for (int j = -radius; j <= radius; ++j) {
        const int v = v0 + j * d;
        const bool inside = v >= 0 && v < H;
        const int vc = v < 0 ? 0 : (v >= H ? H - 1 : v);
        const uint4* row = col + vc * W * kWords;
        uint4 raw[kWords];
#pragma unroll
        for (int w = 0; w < kWords; ++w) raw[w] = __ldg(row + w);
        const float s = dot_row<scalar_t, kWords>(raw, q);
        if (inside && s > best) {  // strict: ties keep the first candidate visited; NaN never wins
          best = s;
          ub = u;
          vb = v;
        }
      }
    }
    u0 = ub;
    v0 = vb;
  }
  p1_out[2 * pix + 0] = ub;
  p1_out[2 * pix + 1] = vb;
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

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
  // fast path (see refine_matches_vec_kernel): F == 24 half/float, 16-byte aligned rows, int32-sized indices
  constexpr int64_t kInt32Limit = int64_t(1) << 31;
  const bool fast = (st == torch::kFloat16 || st == torch::kFloat32) && F == kRefineFastF &&
                    aligned16(D11.data_ptr()) && aligned16(D21.data_ptr()) && B * H * W * F < kInt32Limit &&
                    radius < (int64_t(1) << 20) && dilation_max < (int64_t(1) << 20) &&
                    radius * dilation_max + (H > W ? H : W) < (int64_t(1) << 30);
  if (fast) {
    const int iH = static_cast<int>(H), iW = static_cast<int>(W), iHW = static_cast<int>(H * W);
    const int ir = static_cast<int>(radius), idm = static_cast<int>(dilation_max);
    const auto* d11 = static_cast<const uint4*>(D11.data_ptr());
    const auto* d21 = static_cast<const uint4*>(D21.data_ptr());
    const int64_t* pin = p1.data_ptr<int64_t>();
    int64_t* pout = out.data_ptr<int64_t>();
    const float half_init = 0.f;                                   // best_init of half (see below)
    const float float_init = std::numeric_limits<float>::min();   // best_init of float
    if (st == torch::kFloat16 && radius == 3) {  // SLAM setting: compile-time radius
      refine_matches_vec_kernel<c10::Half, kRefineFastF, 3>
          <<<grid, kThreads, 0, stream>>>(d11, d21, pin, pout, iH, iW, iHW, ir, idm, half_init);
    } else if (st == torch::kFloat16) {
      refine_matches_vec_kernel<c10::Half, kRefineFastF, -1>
          <<<grid, kThreads, 0, stream>>>(d11, d21, pin, pout, iH, iW, iHW, ir, idm, half_init);
    } else if (radius == 3) {
      refine_matches_vec_kernel<float, kRefineFastF, 3>
          <<<grid, kThreads, 0, stream>>>(d11, d21, pin, pout, iH, iW, iHW, ir, idm, float_init);
    } else {
      refine_matches_vec_kernel<float, kRefineFastF, -1>
          <<<grid, kThreads, 0, stream>>>(d11, d21, pin, pout, iH, iW, iHW, ir, idm, float_init);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
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
