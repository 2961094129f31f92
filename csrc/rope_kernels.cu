// Fused 2-D RoPE rotation of attention tokens (spec mast3r_network.md §3.2; PyTorch twin: RoPE2D.apply in
// mast3r_slam_ros/network/rope.py, which is also the reference in the tests).
//
// out[l,b,h,n,d] = x[l,b,h,n,d] * cos[b',n,d] + x[l,b,h,n,partner(d)] * sin[b',n,d]   (float32 math, output in x's dtype)
// partner(d) swaps the two quarters inside each half of the head dimension D ("rotate half" pairing), the sign of the
// rotation is folded into sin by RoPE2D.tables; b' = b if the tables have the batch, else 0.
// One thread per output element; x may be a strided view (e.g. q and k of the fused qkv projection), the last dimension
// must be contiguous. The unfused PyTorch version launches 5 kernels (upcast, flip, mul, addcmul, downcast) per call.
#include "kernels.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

namespace mast3r_slam_ros {
namespace {

constexpr int kRopeThreads = 256;
constexpr int kRopeDims = 5;

struct Shape5 {
  int64_t size[kRopeDims];    // L, B, H, N, D
  int64_t stride[kRopeDims];  // strides of x (elements)
};

template <typename T>
__device__ __forceinline__ float to_f(T v) {
  return static_cast<float>(v);
}

template <typename scalar_t>
__global__ void rope_apply_kernel(const scalar_t* __restrict__ x, const float* __restrict__ cos_t,
                                  const float* __restrict__ sin_t, scalar_t* __restrict__ out, Shape5 s,
                                  int64_t table_batch, int64_t total) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRopeThreads + threadIdx.x;
  if (i >= total) return;
  const int64_t D = s.size[4], N = s.size[3], H = s.size[2], B = s.size[1];
  int64_t r = i;
  const int64_t d = r % D;
  r /= D;
  const int64_t n = r % N;
  r /= N;
  const int64_t h = r % H;
  r /= H;
  const int64_t b = r % B;
  const int64_t l = r / B;
  const int64_t half = D / 2, quarter = D / 4;
  const int64_t in_half = d % half;
  const int64_t partner = d - in_half + (in_half < quarter ? in_half + quarter : in_half - quarter);
  const int64_t base = l * s.stride[0] + b * s.stride[1] + h * s.stride[2] + n * s.stride[3];
  const int64_t t = ((table_batch > 1 ? b : 0) * N + n) * D + d;
  const float xv = to_f(x[base + d]);
  const float pv = to_f(x[base + partner]);
  const float prod = xv * cos_t[t];  // rounded first, as torch's x*cos before addcmul
  out[i] = static_cast<scalar_t>(fmaf(pv, sin_t[t], prod));
}

}  // namespace

torch::Tensor rope_apply_cuda(const torch::Tensor& x, const torch::Tensor& cos_t, const torch::Tensor& sin_t) {
  M3R_CHECK_CUDA(x);
  M3R_CHECK_INPUT(cos_t, torch::kFloat32);
  M3R_CHECK_INPUT(sin_t, torch::kFloat32);
  const auto st = x.scalar_type();
  TORCH_CHECK(st == torch::kFloat32 || st == torch::kFloat16 || st == torch::kBFloat16,
              "x must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(x.dim() == kRopeDims, "x must be [L,B,H,N,D], got ", m3r_shape(x));
  TORCH_CHECK(x.stride(4) == 1, "x must be contiguous in its last dimension");
  const int64_t B = x.size(1), N = x.size(3), D = x.size(4);
  TORCH_CHECK(D > 0 && D % 4 == 0, "head dimension must be a positive multiple of 4, got ", m3r_int(D));
  TORCH_CHECK(cos_t.dim() == 4 && cos_t.size(1) == 1 && cos_t.size(2) == N && cos_t.size(3) == D &&
                  (cos_t.size(0) == 1 || cos_t.size(0) == B),
              "cos must be [1 or B,1,N,D] = [.,1,", m3r_int(N), ",", m3r_int(D), "], got ", m3r_shape(cos_t));
  TORCH_CHECK(sin_t.sizes() == cos_t.sizes(), "sin must have the shape of cos, got ", m3r_shape(sin_t));
  TORCH_CHECK(cos_t.device() == x.device() && sin_t.device() == x.device(), "all inputs must be on the same device");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t total = x.numel();
  if (total == 0) return out;
  Shape5 s;
  for (int k = 0; k < kRopeDims; ++k) {
    s.size[k] = x.size(k);
    s.stride[k] = x.stride(k);
  }
  const int64_t blocks = (total + kRopeThreads - 1) / kRopeThreads;
  TORCH_CHECK(blocks <= 2147483647LL, "too many elements for one launch: ", m3r_int(total));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, st, "rope_apply_cuda", [&] {
    rope_apply_kernel<scalar_t><<<static_cast<unsigned int>(blocks), kRopeThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), cos_t.data_ptr<float>(), sin_t.data_ptr<float>(), out.data_ptr<scalar_t>(), s,
        cos_t.size(0), total);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace mast3r_slam_ros
