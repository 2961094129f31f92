// CUDA kernels for the per-edge Gauss-Newton sums of the global optimization (spec upstream_algorithm.md §6.4-§6.7).
//
// For every directed edge e = (i, j) with relative pose T_ij = T_i^-1 T_j (computed by the caller, lietorch layout
// [t, q_xyzw, s]) and every pixel k of keyframe j: P = T_ij X_j,k, residual r (prediction - measurement), whitening
// sqrt(w0) = sqrt(Q)/sigma (0 if invalid), Huber (1.345) IRLS weight w = huber(sqrt(w0) r) w0, Jacobian Jr w.r.t. a
// left perturbation of T_ij. The kernel reduces Hr = sum Jr^T W Jr (upper triangle, 28), gr = sum Jr^T W r (7) and the
// robust cost sum rho(sqrt(w0) r) (1) per edge. The world-frame Jacobians J_j = Jr Ad(T_i^-1), J_i = -J_j, the
// assembly of the reduced system, the solve and the retraction are done by the same PyTorch code as the PyTorch backend
// (mast3r_slam_ros/kernels/gn_torch.py), which is also the reference in the tests.
//
// Launch: grid (blocks_per_edge, 2E), kThreads threads; each thread strides over the pixels of its edge (bounds
// checked), float64 accumulators, block reduction by warp shuffles + shared memory, per-block partial sums summed by
// torch (float64).
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
constexpr int kNH = 28;               // upper triangle of a 7x7
constexpr int kNOut = kNH + 7 + 1;    // Hr, gr, cost
constexpr int kMaxRes = 4;            // residual rows (rays: 4, calib/points: 3)
constexpr int64_t kMaxBlocksPerEdge = 64;
constexpr int64_t kPixelsPerThread = 8;
constexpr float kHuber = 1.345f;

struct Pose {
  float t[3];
  float q[4];  // x, y, z, w (normalized)
  float s;
};

__device__ __forceinline__ void cross3(const float a[3], const float b[3], float c[3]) {
  c[0] = a[1] * b[2] - a[2] * b[1];
  c[1] = a[2] * b[0] - a[0] * b[2];
  c[2] = a[0] * b[1] - a[1] * b[0];
}

// T p = s R(q) p + t with the quaternion rotation uv = 2 v x p; p' = p + w uv + v x uv (spec §9.1)
__device__ __forceinline__ void act(const Pose& T, const float p[3], float out[3]) {
  const float v[3] = {T.q[0], T.q[1], T.q[2]};
  float uv[3], vuv[3];
  cross3(v, p, uv);
  uv[0] *= 2.f;
  uv[1] *= 2.f;
  uv[2] *= 2.f;
  cross3(v, uv, vuv);
#pragma unroll
  for (int a = 0; a < 3; ++a) out[a] = T.s * (p[a] + T.q[3] * uv[a] + vuv[a]) + T.t[a];
}

__device__ __forceinline__ float huber_w(float x) {
  const float a = fabsf(x);
  return a < kHuber ? 1.f : kHuber / a;
}

__device__ __forceinline__ float huber_rho(float x) {
  const float a = fabsf(x);
  return a <= kHuber ? a * a : 2.f * kHuber * a - kHuber * kHuber;
}

// Residual models: eval() fills err[R], sw[R] (sqrt(w0) per row) and J[R][7]; returns false for an invalid pixel.
struct RaysRes {
  static constexpr int R = 4;
  float inv_sigma_ray, inv_sigma_dist;
  __device__ bool eval(const float P[3], const float Xi[3], int64_t /*m*/, float sq, float err[kMaxRes],
                       float sw[kMaxRes], float J[kMaxRes][7]) const {
    const float nP = sqrtf(P[0] * P[0] + P[1] * P[1] + P[2] * P[2]);
    const float nX = sqrtf(Xi[0] * Xi[0] + Xi[1] * Xi[1] + Xi[2] * Xi[2]);
    if (!(nP > 0.f) || !(nX > 0.f)) return false;  // guard (upstream divides unguarded)
    const float r[3] = {P[0] / nP, P[1] / nP, P[2] / nP};
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      err[a] = r[a] - Xi[a] / nX;
      sw[a] = sq * inv_sigma_ray;
#pragma unroll
      for (int b = 0; b < 3; ++b) J[a][b] = ((a == b ? 1.f : 0.f) - r[a] * r[b]) / nP;
      J[a][6] = 0.f;
    }
    // -[r]x
    J[0][3] = 0.f;   J[0][4] = r[2];  J[0][5] = -r[1];
    J[1][3] = -r[2]; J[1][4] = 0.f;   J[1][5] = r[0];
    J[2][3] = r[1];  J[2][4] = -r[0]; J[2][5] = 0.f;
    err[3] = nP - nX;
    sw[3] = sq * inv_sigma_dist;
    J[3][0] = r[0]; J[3][1] = r[1]; J[3][2] = r[2];
    J[3][3] = 0.f;  J[3][4] = 0.f;  J[3][5] = 0.f;
    J[3][6] = nP;
    return true;
  }
};

struct CalibRes {
  static constexpr int R = 3;
  float fx, fy, cx, cy, z_eps, border, inv_sigma_pix, inv_sigma_depth;
  int64_t height, width;
  __device__ bool eval(const float P[3], const float Xi[3], int64_t m, float sq, float err[kMaxRes],
                       float sw[kMaxRes], float J[kMaxRes][7]) const {
    const float z = P[2];
    if (!(z > z_eps) || !(Xi[2] > z_eps)) return false;
    const float zinv = 1.f / z;
    const float x = P[0] * zinv, y = P[1] * zinv;
    const float u = fx * x + cx, v = fy * y + cy;
    if (!(u > border && u < static_cast<float>(width - 1) - border && v > border &&
          v < static_cast<float>(height - 1) - border))
      return false;
    const float ut = static_cast<float>(m % width), vt = static_cast<float>(m / width);
    err[0] = u - ut;
    err[1] = v - vt;
    err[2] = logf(z) - logf(Xi[2]);
    sw[0] = sq * inv_sigma_pix;
    sw[1] = sq * inv_sigma_pix;
    sw[2] = sq * inv_sigma_depth;
    J[0][0] = fx * zinv; J[0][1] = 0.f;       J[0][2] = -fx * x * zinv;
    J[0][3] = -fx * x * y; J[0][4] = fx * (1.f + x * x); J[0][5] = -fx * y; J[0][6] = 0.f;
    J[1][0] = 0.f;       J[1][1] = fy * zinv; J[1][2] = -fy * y * zinv;
    J[1][3] = -fy * (1.f + y * y); J[1][4] = fy * x * y; J[1][5] = fy * x; J[1][6] = 0.f;
    J[2][0] = 0.f; J[2][1] = 0.f; J[2][2] = zinv;
    J[2][3] = y;   J[2][4] = -x;  J[2][5] = 0.f; J[2][6] = 1.f;
    return true;
  }
};

struct PointsRes {
  static constexpr int R = 3;
  float inv_sigma_point;
  __device__ bool eval(const float P[3], const float Xi[3], int64_t /*m*/, float sq, float err[kMaxRes],
                       float sw[kMaxRes], float J[kMaxRes][7]) const {
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      err[a] = P[a] - Xi[a];
      sw[a] = sq * inv_sigma_point;
#pragma unroll
      for (int b = 0; b < 3; ++b) J[a][b] = (a == b) ? 1.f : 0.f;
      J[a][6] = P[a];
    }
    // -[P]x
    J[0][3] = 0.f;   J[0][4] = P[2];  J[0][5] = -P[1];
    J[1][3] = -P[2]; J[1][4] = 0.f;   J[1][5] = P[0];
    J[2][3] = P[1];  J[2][4] = -P[0]; J[2][5] = 0.f;
    return true;
  }
};

template <class Res>
__global__ void gn_blocks_kernel(const float* __restrict__ Tij, const float* __restrict__ Xs,
                                 const float* __restrict__ Cs, const int64_t* __restrict__ ii,
                                 const int64_t* __restrict__ jj, const int64_t* __restrict__ idx,
                                 const bool* __restrict__ valid, const float* __restrict__ Q, int64_t n_kf,
                                 int64_t HW, float C_thresh, float Q_thresh, Res res, double* __restrict__ partial) {
  __shared__ double smem[kWarps][kNOut];
  const int64_t e = blockIdx.y;
  const int64_t blk = blockIdx.x;
  const int64_t nb = gridDim.x;
  const int tid = threadIdx.x;
  const int64_t i = ii[e];
  const int64_t j = jj[e];
  const bool edge_ok = i >= 0 && i < n_kf && j >= 0 && j < n_kf;

  Pose T;
  const float* td = Tij + e * 8;
  T.t[0] = td[0];
  T.t[1] = td[1];
  T.t[2] = td[2];
  const float qn = sqrtf(td[3] * td[3] + td[4] * td[4] + td[5] * td[5] + td[6] * td[6]);
  const float qinv = qn > 0.f ? 1.f / qn : 0.f;
  T.q[0] = td[3] * qinv;
  T.q[1] = td[4] * qinv;
  T.q[2] = td[5] * qinv;
  T.q[3] = td[6] * qinv;
  T.s = td[7];

  // per-pixel terms in float, sums in double: the gradient is a sum of many large, partly cancelling (Huber-clipped
  // outlier) terms and float sums there move the GN step by ~1e-4 relative
  double acc[kNOut];
#pragma unroll
  for (int a = 0; a < kNOut; ++a) acc[a] = 0.0;

  if (edge_ok) {
    for (int64_t k = blk * kThreads + tid; k < HW; k += nb * kThreads) {
      const int64_t ek = e * HW + k;
      const bool vm = valid[ek];
      const int64_t m = vm ? idx[ek] : 0;
      if (m < 0 || m >= HW) continue;  // out-of-range match index: invalid pixel
      const float q = Q[ek];
      const float Ci = Cs[i * HW + m];
      const float Cj = Cs[j * HW + k];
      if (!(vm && q > Q_thresh && Ci > C_thresh && Cj > C_thresh)) continue;
      const float* xi = Xs + (i * HW + m) * 3;
      const float* xj = Xs + (j * HW + k) * 3;
      const float Xi[3] = {xi[0], xi[1], xi[2]};
      const float Xj[3] = {xj[0], xj[1], xj[2]};
      float P[3];
      act(T, Xj, P);
      const float sq = sqrtf(fmaxf(q, 0.f));
      float err[kMaxRes], sw[kMaxRes], J[kMaxRes][7];
      if (!res.eval(P, Xi, m, sq, err, sw, J)) continue;
      bool finite = true;
#pragma unroll
      for (int r = 0; r < Res::R; ++r) {
        finite = finite && isfinite(err[r]);
#pragma unroll
        for (int a = 0; a < 7; ++a) finite = finite && isfinite(J[r][a]);
      }
      if (!finite) continue;
#pragma unroll
      for (int r = 0; r < Res::R; ++r) {
        const float x = sw[r] * err[r];
        const float w = huber_w(x) * sw[r] * sw[r];
        acc[kNOut - 1] += static_cast<double>(huber_rho(x));
        int h = 0;
#pragma unroll
        for (int a = 0; a < 7; ++a) {
          const float wJa = w * J[r][a];
          acc[kNH + a] += static_cast<double>(wJa * err[r]);
#pragma unroll
          for (int b = a; b < 7; ++b) acc[h++] += static_cast<double>(wJa * J[r][b]);
        }
      }
    }
  }

  // block reduction: warp shuffles, then one value per warp in shared memory
  const int lane = tid & 31;
  const int warp = tid >> 5;
#pragma unroll
  for (int a = 0; a < kNOut; ++a) {
    double v = acc[a];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) smem[warp][a] = v;
  }
  __syncthreads();
  if (tid < kNOut) {
    double v = 0.0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += smem[w][tid];
    partial[(e * nb + blk) * kNOut + tid] = v;
  }
}

void check_graph(const torch::Tensor& Tij, const torch::Tensor& Xs, const torch::Tensor& Cs, const torch::Tensor& ii,
                 const torch::Tensor& jj, const torch::Tensor& idx, const torch::Tensor& valid,
                 const torch::Tensor& Q) {
  M3R_CHECK_INPUT(Tij, torch::kFloat32);
  M3R_CHECK_INPUT(Xs, torch::kFloat32);
  M3R_CHECK_INPUT(Cs, torch::kFloat32);
  M3R_CHECK_INPUT(ii, torch::kInt64);
  M3R_CHECK_INPUT(jj, torch::kInt64);
  M3R_CHECK_INPUT(idx, torch::kInt64);
  M3R_CHECK_INPUT(valid, torch::kBool);
  M3R_CHECK_INPUT(Q, torch::kFloat32);
  TORCH_CHECK(Xs.dim() == 3 && Xs.size(2) == 3, "Xs must be [n,HW,3], got ", m3r_shape(Xs));
  const int64_t n = Xs.size(0), HW = Xs.size(1);
  TORCH_CHECK(Cs.dim() == 3 && Cs.size(0) == n && Cs.size(1) == HW && Cs.size(2) == 1,
              "Cs must be [n,HW,1], got ", m3r_shape(Cs));
  TORCH_CHECK(ii.dim() == 1, "ii must be [2E], got ", m3r_shape(ii));
  const int64_t E2 = ii.size(0);
  TORCH_CHECK(jj.dim() == 1 && jj.size(0) == E2, "jj must be [2E], got ", m3r_shape(jj));
  TORCH_CHECK(Tij.dim() == 2 && Tij.size(0) == E2 && Tij.size(1) == 8, "Tij must be [2E,8], got ", m3r_shape(Tij));
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == E2 && idx.size(1) == HW, "idx_ii2jj must be [2E,HW], got ",
              m3r_shape(idx));
  TORCH_CHECK(valid.dim() == 3 && valid.size(0) == E2 && valid.size(1) == HW && valid.size(2) == 1,
              "valid_match must be [2E,HW,1], got ", m3r_shape(valid));
  TORCH_CHECK(Q.dim() == 3 && Q.size(0) == E2 && Q.size(1) == HW && Q.size(2) == 1, "Q must be [2E,HW,1], got ",
              m3r_shape(Q));
  const auto dev = Xs.device();
  TORCH_CHECK(Tij.device() == dev && Cs.device() == dev && ii.device() == dev && jj.device() == dev &&
                  idx.device() == dev && valid.device() == dev && Q.device() == dev,
              "all inputs must be on the same device");
  TORCH_CHECK(E2 <= 65535, "too many directed edges for one launch (grid.y): ", m3r_int(E2));
}

template <class Res>
torch::Tensor launch_blocks(const torch::Tensor& Tij, const torch::Tensor& Xs, const torch::Tensor& Cs,
                            const torch::Tensor& ii, const torch::Tensor& jj, const torch::Tensor& idx,
                            const torch::Tensor& valid, const torch::Tensor& Q, double C_thresh, double Q_thresh,
                            const Res& res) {
  const c10::cuda::CUDAGuard guard(Xs.device());
  const int64_t n = Xs.size(0), HW = Xs.size(1), E2 = ii.size(0);
  if (E2 == 0) return torch::zeros({0, kNOut}, Xs.options().dtype(torch::kFloat64));
  const int64_t nb =
      std::max<int64_t>(1, std::min<int64_t>(kMaxBlocksPerEdge, (HW + kThreads * kPixelsPerThread - 1) /
                                                                    (kThreads * kPixelsPerThread)));
  auto partial = torch::zeros({E2, nb, kNOut}, Xs.options().dtype(torch::kFloat64));
  const dim3 grid(static_cast<unsigned int>(nb), static_cast<unsigned int>(E2));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  gn_blocks_kernel<Res><<<grid, kThreads, 0, stream>>>(
      Tij.data_ptr<float>(), Xs.data_ptr<float>(), Cs.data_ptr<float>(), ii.data_ptr<int64_t>(),
      jj.data_ptr<int64_t>(), idx.data_ptr<int64_t>(), valid.data_ptr<bool>(), Q.data_ptr<float>(), n, HW,
      static_cast<float>(C_thresh), static_cast<float>(Q_thresh), res, partial.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial.sum(1);
}

}  // namespace

torch::Tensor gn_rays_blocks_cuda(const torch::Tensor& Tij, const torch::Tensor& Xs, const torch::Tensor& Cs,
                                  const torch::Tensor& ii, const torch::Tensor& jj, const torch::Tensor& idx,
                                  const torch::Tensor& valid, const torch::Tensor& Q, double sigma_ray,
                                  double sigma_dist, double C_thresh, double Q_thresh) {
  check_graph(Tij, Xs, Cs, ii, jj, idx, valid, Q);
  TORCH_CHECK(sigma_ray > 0 && sigma_dist > 0, "sigmas must be > 0");
  RaysRes res;
  res.inv_sigma_ray = static_cast<float>(1.0 / sigma_ray);
  res.inv_sigma_dist = static_cast<float>(1.0 / sigma_dist);
  return launch_blocks(Tij, Xs, Cs, ii, jj, idx, valid, Q, C_thresh, Q_thresh, res);
}

torch::Tensor gn_calib_blocks_cuda(const torch::Tensor& Tij, const torch::Tensor& Xs, const torch::Tensor& Cs,
                                   const torch::Tensor& K, const torch::Tensor& ii, const torch::Tensor& jj,
                                   const torch::Tensor& idx, const torch::Tensor& valid, const torch::Tensor& Q,
                                   int64_t height, int64_t width, int64_t pixel_border, double z_eps,
                                   double sigma_pixel, double sigma_depth, double C_thresh, double Q_thresh) {
  check_graph(Tij, Xs, Cs, ii, jj, idx, valid, Q);
  TORCH_CHECK(K.dim() == 2 && K.size(0) == 3 && K.size(1) == 3, "K must be [3,3], got ", m3r_shape(K));
  TORCH_CHECK(height > 0 && width > 0 && height * width == Xs.size(1), "height*width must equal HW");
  TORCH_CHECK(sigma_pixel > 0 && sigma_depth > 0, "sigmas must be > 0");
  // K is tiny: read it on the host (one small device-to-host copy per call)
  const auto Kc = K.to(torch::kCPU, torch::kFloat64).contiguous();
  const double* k = Kc.data_ptr<double>();
  CalibRes res;
  res.fx = static_cast<float>(k[0]);
  res.fy = static_cast<float>(k[4]);
  res.cx = static_cast<float>(k[2]);
  res.cy = static_cast<float>(k[5]);
  res.z_eps = static_cast<float>(z_eps);
  res.border = static_cast<float>(pixel_border);
  res.inv_sigma_pix = static_cast<float>(1.0 / sigma_pixel);
  res.inv_sigma_depth = static_cast<float>(1.0 / sigma_depth);
  res.height = height;
  res.width = width;
  return launch_blocks(Tij, Xs, Cs, ii, jj, idx, valid, Q, C_thresh, Q_thresh, res);
}

torch::Tensor gn_points_blocks_cuda(const torch::Tensor& Tij, const torch::Tensor& Xs, const torch::Tensor& Cs,
                                    const torch::Tensor& ii, const torch::Tensor& jj, const torch::Tensor& idx,
                                    const torch::Tensor& valid, const torch::Tensor& Q, double sigma_point,
                                    double C_thresh, double Q_thresh) {
  check_graph(Tij, Xs, Cs, ii, jj, idx, valid, Q);
  TORCH_CHECK(sigma_point > 0, "sigma_point must be > 0");
  PointsRes res;
  res.inv_sigma_point = static_cast<float>(1.0 / sigma_point);
  return launch_blocks(Tij, Xs, Cs, ii, jj, idx, valid, Q, C_thresh, Q_thresh, res);
}

}  // namespace mast3r_slam_ros
