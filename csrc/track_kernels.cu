// Fused frame-to-keyframe tracking linearization (spec upstream_algorithm.md §5.2-§5.4): one Gauss-Newton system of
// the relative pose T = T_CkCf (Sim(3), left perturbation Exp(xi) T, tangent order tau, omega, sigma) per call.
//
// For every pixel n: P = T Xf[n], residual r (4 rows ray + distance, or 3 rows pixel + log-depth), Jacobian J = dr/dxi,
// square-root information si, Huber IRLS weight w = huber(si r), s = si sqrt(w), A = s J, b = s r (float32, the same
// formulas and operation order as the PyTorch reference mast3r_slam_ros/kernels/track_torch.py). The kernel sums in
// float64: the 28 upper-triangle entries of H = A^T A, A^T b (7), b^T b (1) and the number of pixels with non-zero
// information (1); a second kernel reduces the per-block partial sums and writes the packed [58] float64 output
// H (49, row-major), A^T b (7), b^T b (1), n_valid (1) that the tracker copies to the host in one transfer.
//
// Launch: stage 1 grid = nb blocks (depends only on N), kThreads threads, grid-stride over pixels, per-thread double
// accumulators, warp-shuffle + shared-memory block reduction, partial[nb,37]; stage 2 grid = 37 blocks, each reduces
// one column of partial in a fixed order. Deterministic (no atomics), no host synchronization, no data-dependent
// allocation: capturable in a CUDA graph. T, K and base are read on the device.
// MSVC-safe: int64_t, constexpr sizes, no VLAs, no GCC builtins.
#include "kernels.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <algorithm>

namespace mast3r_slam_ros {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kNH = 28;                  // upper triangle of the 7x7 H
constexpr int kNAcc = kNH + 7 + 1 + 1;   // H, A^T b, b^T b, n_valid
constexpr int kNOut = 49 + 7 + 1 + 1;    // packed output
constexpr int kMaxRows = 4;              // residual rows per pixel (rays 4, calib 3)
constexpr int64_t kRowsPerThread = 4;    // pixels per thread before the block count is capped
constexpr int64_t kMaxBlocks = 1024;

// s R (from the normalized quaternion, as lie.quat_to_matrix) and t of the Sim(3) data [t(3), q_xyzw(4), s(1)]
struct PoseM {
  float M[3][3];
  float t[3];
};

__device__ __forceinline__ PoseM load_pose(const float* __restrict__ Td) {
  PoseM T;
  const float qx0 = Td[3], qy0 = Td[4], qz0 = Td[5], qw0 = Td[6];
  const float qn = sqrtf(qx0 * qx0 + qy0 * qy0 + qz0 * qz0 + qw0 * qw0);
  const float x = qx0 / qn, y = qy0 / qn, z = qz0 / qn, w = qw0 / qn;
  const float xx = x * x, yy = y * y, zz = z * z;
  const float xy = x * y, xz = x * z, yz = y * z;
  const float wx = w * x, wy = w * y, wz = w * z;
  const float R[3][3] = {{1.f - 2.f * (yy + zz), 2.f * (xy - wz), 2.f * (xz + wy)},
                         {2.f * (xy + wz), 1.f - 2.f * (xx + zz), 2.f * (yz - wx)},
                         {2.f * (xz - wy), 2.f * (yz + wx), 1.f - 2.f * (xx + yy)}};
  const float s = Td[7];
#pragma unroll
  for (int a = 0; a < 3; ++a) {
#pragma unroll
    for (int b = 0; b < 3; ++b) T.M[a][b] = s * R[a][b];
    T.t[a] = Td[a];
  }
  return T;
}

// P = t + X0 M[:,0] + X1 M[:,1] + X2 M[:,2] (the order of Sim3.act)
__device__ __forceinline__ void act(const PoseM& T, const float X[3], float P[3]) {
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    float v = T.t[a] + X[0] * T.M[a][0];
    v = v + X[1] * T.M[a][1];
    P[a] = v + X[2] * T.M[a][2];
  }
}

// J = -(D pj) with the [R,3] derivative D of the residual prediction w.r.t. P and pj = [I, -[P]x, P] (3x7)
template <int R>
__device__ __forceinline__ void chain(const float D[kMaxRows][3], const float P[3], float J[kMaxRows][7]) {
  const float pj[3][7] = {{1.f, 0.f, 0.f, 0.f, P[2], -P[1], P[0]},
                          {0.f, 1.f, 0.f, -P[2], 0.f, P[0], P[1]},
                          {0.f, 0.f, 1.f, P[1], -P[0], 0.f, P[2]}};
#pragma unroll
  for (int i = 0; i < R; ++i) {
#pragma unroll
    for (int c = 0; c < 7; ++c) J[i][c] = -(D[i][0] * pj[0][c] + D[i][1] * pj[1][c] + D[i][2] * pj[2][c]);
  }
}

// ray + distance (spec §5.2): r = [Xk/|Xk|, |Xk|] - [P/|P|, |P|]
struct RaysModel {
  static constexpr int R = 4;
  const float* Xk;
  const float* sqrt_info;
  __device__ __forceinline__ void eval(int64_t n, const float P[3], float r[kMaxRows], float J[kMaxRows][7],
                                       float si[kMaxRows]) const {
    const float xk[3] = {Xk[n * 3], Xk[n * 3 + 1], Xk[n * 3 + 2]};
    const float dk = sqrtf(xk[0] * xk[0] + xk[1] * xk[1] + xk[2] * xk[2]);
    const float dkc = fmaxf(dk, 1e-12f);
    const float d = fmaxf(sqrtf(P[0] * P[0] + P[1] * P[1] + P[2] * P[2]), 1e-12f);
    const float ray[3] = {P[0] / d, P[1] / d, P[2] / d};
    float D[kMaxRows][3];
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      r[a] = xk[a] / dkc - ray[a];
#pragma unroll
      for (int b = 0; b < 3; ++b) D[a][b] = ((a == b ? 1.f : 0.f) - ray[a] * ray[b]) / d;
      D[3][a] = ray[a];
    }
    r[3] = dk - d;
    chain<R>(D, P, J);
#pragma unroll
    for (int i = 0; i < R; ++i) si[i] = sqrt_info[n * 4 + i];
  }
};

// pixel + log-depth (spec §5.3): r = meas - [fx x/z + cx, fy y/z + cy, log z]
struct CalibModel {
  static constexpr int R = 3;
  const float* meas;
  const bool* stat;
  const float* sq;
  const float* base;  // [3] on the device
  const float* K;     // [3,3] on the device
  float border, w_hi, h_hi, z_eps;
  __device__ __forceinline__ void eval(int64_t n, const float P[3], float r[kMaxRows], float J[kMaxRows][7],
                                       float si[kMaxRows]) const {
    const float fx = K[0], fy = K[4], cx = K[2], cy = K[5];
    const float x = P[0], y = P[1], z = P[2];
    const bool zpos = z > z_eps;
    const float zs = zpos ? z : 1.f;
    const float u = fx * x / zs + cx;
    const float v = fy * y / zs + cy;
    const float logz = zpos ? logf(zs) : 0.f;
    const bool valid_proj = (u > border) && (u < w_hi) && (v > border) && (v < h_hi) && zpos;
    r[0] = meas[n * 3] - u;
    r[1] = meas[n * 3 + 1] - v;
    r[2] = meas[n * 3 + 2] - logz;
    const float zs2 = zs * zs;
    const float D[kMaxRows][3] = {{fx / zs, 0.f, -fx * x / zs2},
                                  {0.f, fy / zs, -fy * y / zs2},
                                  {0.f, 0.f, 1.f / zs},
                                  {0.f, 0.f, 0.f}};
    chain<R>(D, P, J);
    const float m = (stat[n] && valid_proj) ? 1.f : 0.f;
    const float msq = m * sq[n];
#pragma unroll
    for (int i = 0; i < R; ++i) si[i] = msq * base[i];
  }
};

template <class Model>
__global__ void track_system_kernel(const float* __restrict__ Td, const float* __restrict__ Xf, int64_t N, float huber,
                                    Model model, double* __restrict__ partial) {
  __shared__ double smem[kWarps][kNAcc];
  const int tid = threadIdx.x;
  const PoseM T = load_pose(Td);
  double acc[kNAcc];
#pragma unroll
  for (int a = 0; a < kNAcc; ++a) acc[a] = 0.0;

  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + tid; n < N; n += stride) {
    const float X[3] = {Xf[n * 3], Xf[n * 3 + 1], Xf[n * 3 + 2]};
    float P[3];
    act(T, X, P);
    float r[kMaxRows], J[kMaxRows][7], si[kMaxRows];
    model.eval(n, P, r, J, si);
    float si_abs = 0.f;
#pragma unroll
    for (int i = 0; i < Model::R; ++i) {
      si_abs += fabsf(si[i]);
      // Huber IRLS weight of the whitened residual (track_torch.huber_weight)
      const float xa = fabsf(si[i] * r[i]);
      const float w = xa < huber ? 1.f : huber / fmaxf(xa, 1e-30f);
      const float s = si[i] * sqrtf(w);
      double A[7];
#pragma unroll
      for (int c = 0; c < 7; ++c) A[c] = static_cast<double>(s * J[i][c]);
      const double b = static_cast<double>(s * r[i]);
      int h = 0;
#pragma unroll
      for (int a = 0; a < 7; ++a) {
#pragma unroll
        for (int c = a; c < 7; ++c) acc[h++] += A[a] * A[c];
        acc[kNH + a] += A[a] * b;
      }
      acc[kNH + 7] += b * b;
    }
    if (si_abs > 0.f) acc[kNH + 8] += 1.0;
  }

  // block reduction: warp shuffles, then one value per warp in shared memory, summed in warp order
  const int lane = tid & 31;
  const int warp = tid >> 5;
#pragma unroll
  for (int a = 0; a < kNAcc; ++a) {
    double v = acc[a];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) smem[warp][a] = v;
  }
  __syncthreads();
  if (tid < kNAcc) {
    double v = 0.0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += smem[w][tid];
    partial[static_cast<int64_t>(blockIdx.x) * kNAcc + tid] = v;
  }
}

// one block per accumulator column a: out = sum over the nb partial rows (fixed order), expanded to the packed layout
__global__ void track_reduce_kernel(const double* __restrict__ partial, int64_t nb, double* __restrict__ out) {
  __shared__ double smem[kWarps];
  const int a = blockIdx.x;
  const int tid = threadIdx.x;
  double v = 0.0;
  for (int64_t k = tid; k < nb; k += kThreads) v += partial[k * kNAcc + a];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if ((tid & 31) == 0) smem[tid >> 5] = v;
  __syncthreads();
  if (tid != 0) return;
  double s = 0.0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) s += smem[w];
  if (a < kNH) {
    int h = 0;
    for (int i = 0; i < 7; ++i) {
      for (int j = i; j < 7; ++j) {
        if (h == a) {
          out[i * 7 + j] = s;
          out[j * 7 + i] = s;
        }
        ++h;
      }
    }
  } else {
    out[49 + (a - kNH)] = s;  // A^T b (7), b^T b, n_valid
  }
}

void check_pose_points(const torch::Tensor& T, const torch::Tensor& Xf, double huber) {
  M3R_CHECK_INPUT(T, torch::kFloat32);
  M3R_CHECK_INPUT(Xf, torch::kFloat32);
  TORCH_CHECK(T.dim() == 2 && T.size(0) == 1 && T.size(1) == 8, "T must be [1,8] (t, q_xyzw, s), got ",
              m3r_shape(T));
  TORCH_CHECK(Xf.dim() == 2 && Xf.size(1) == 3, "Xf must be [N,3], got ", m3r_shape(Xf));
  TORCH_CHECK(T.device() == Xf.device(), "T and Xf must be on the same device");
  TORCH_CHECK(huber > 0.0, "huber must be > 0");
}

void check_rows(const torch::Tensor& t, const char* name, int64_t N, int64_t cols, const torch::Tensor& Xf) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == cols, name, " must be [N,", m3r_int(cols),
              "] with N=", m3r_int(N), ", got ", m3r_shape(t));
  TORCH_CHECK(t.device() == Xf.device(), name, " must be on the device of Xf");
}

template <class Model>
torch::Tensor launch_track(const torch::Tensor& T, const torch::Tensor& Xf, double huber, const Model& model) {
  const c10::cuda::CUDAGuard guard(Xf.device());
  const int64_t N = Xf.size(0);
  const int64_t per_block = kThreads * kRowsPerThread;
  const int64_t nb = std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, (N + per_block - 1) / per_block));
  const auto dopt = Xf.options().dtype(torch::kFloat64);
  auto partial = torch::empty({nb, kNAcc}, dopt);
  auto out = torch::empty({kNOut}, dopt);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  track_system_kernel<Model><<<static_cast<unsigned int>(nb), kThreads, 0, stream>>>(
      T.data_ptr<float>(), Xf.data_ptr<float>(), N, static_cast<float>(huber), model, partial.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  track_reduce_kernel<<<kNAcc, kThreads, 0, stream>>>(partial.data_ptr<double>(), nb, out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

torch::Tensor track_system_rays_cuda(const torch::Tensor& T, const torch::Tensor& Xf, const torch::Tensor& Xk,
                                     const torch::Tensor& sqrt_info, double huber) {
  check_pose_points(T, Xf, huber);
  M3R_CHECK_INPUT(Xk, torch::kFloat32);
  M3R_CHECK_INPUT(sqrt_info, torch::kFloat32);
  const int64_t N = Xf.size(0);
  check_rows(Xk, "Xk", N, 3, Xf);
  check_rows(sqrt_info, "sqrt_info", N, 4, Xf);
  RaysModel model;
  model.Xk = Xk.data_ptr<float>();
  model.sqrt_info = sqrt_info.data_ptr<float>();
  return launch_track(T, Xf, huber, model);
}

torch::Tensor track_system_calib_cuda(const torch::Tensor& T, const torch::Tensor& Xf, const torch::Tensor& meas_k,
                                      const torch::Tensor& valid_static, const torch::Tensor& sq,
                                      const torch::Tensor& base, const torch::Tensor& K, int64_t height,
                                      int64_t width, double pixel_border, double z_eps, double huber) {
  check_pose_points(T, Xf, huber);
  M3R_CHECK_INPUT(meas_k, torch::kFloat32);
  M3R_CHECK_INPUT(valid_static, torch::kBool);
  M3R_CHECK_INPUT(sq, torch::kFloat32);
  M3R_CHECK_INPUT(base, torch::kFloat32);
  M3R_CHECK_INPUT(K, torch::kFloat32);
  const int64_t N = Xf.size(0);
  check_rows(meas_k, "meas_k", N, 3, Xf);
  check_rows(valid_static, "static", N, 1, Xf);
  check_rows(sq, "sq", N, 1, Xf);
  TORCH_CHECK(base.dim() == 1 && base.size(0) == 3, "base must be [3], got ", m3r_shape(base));
  TORCH_CHECK(K.dim() == 2 && K.size(0) == 3 && K.size(1) == 3, "K must be [3,3], got ", m3r_shape(K));
  TORCH_CHECK(base.device() == Xf.device() && K.device() == Xf.device(), "base and K must be on the device of Xf");
  TORCH_CHECK(height > 0 && width > 0, "height and width must be > 0, got ", m3r_int(height), "x", m3r_int(width));
  CalibModel model;
  model.meas = meas_k.data_ptr<float>();
  model.stat = valid_static.data_ptr<bool>();
  model.sq = sq.data_ptr<float>();
  model.base = base.data_ptr<float>();
  model.K = K.data_ptr<float>();
  // bounds as the float32 values PyTorch compares against (Python scalars cast to the tensor's dtype)
  model.border = static_cast<float>(pixel_border);
  model.w_hi = static_cast<float>(static_cast<double>(width) - 1.0 - pixel_border);
  model.h_hi = static_cast<float>(static_cast<double>(height) - 1.0 - pixel_border);
  model.z_eps = static_cast<float>(z_eps);
  return launch_track(T, Xf, huber, model);
}

}  // namespace mast3r_slam_ros
