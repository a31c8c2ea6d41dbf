/* A host emulation of the few CUDA features the generated kernels use, so that tests/test_cuda.py can run
 * generated/<module>.cu on the CPU (compiled by the host C++ compiler) where no GPU is: each warp's 32 lanes
 * are 32 host threads, the shuffles exchange values through a barrier, blocks and warps run one after
 * another (the kernels never synchronize a block).  Math is the host's libm (not libdevice), so this checks
 * the kernels' logic (indexing, lanes, the warp reductions, flags, launchers), not the GPU's math library.
 * Only for tests: not a CUDA implementation. */
#ifndef DERIVE_CUDA_EMUL_H
#define DERIVE_CUDA_EMUL_H

#include <barrier>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

typedef int cudaError_t;
typedef void *cudaStream_t;
enum { cudaSuccess = 0 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount };
inline cudaError_t cudaGetDevice(int *d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr, int) { *v = 1; return cudaSuccess; }
inline cudaError_t cudaGetLastError(void) { return cudaSuccess; }
inline const char *cudaGetErrorString(cudaError_t) { return "emulated"; }

/* the 16-bit storage types, as the GPU holds them: IEEE binary16 (the host's _Float16, converted to nearest
 * even) and bfloat16 (the top half of a float32, rounded to nearest even, NaN kept quiet) */
struct __half { _Float16 h; };
struct __nv_bfloat16 { uint16_t bits; };
inline float __half2float(__half h) { return (float)h.h; }
inline __half __float2half_rn(float f) { return __half{(_Float16)f}; }
inline float __bfloat162float(__nv_bfloat16 h)
{
    const uint32_t u = (uint32_t)h.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f)
{
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40u)};
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}

struct DeriveEmulWarp {
    std::barrier<> bar{32};
    unsigned char slot[32][8];
};
inline thread_local DeriveEmulWarp *derive_emul_warp = nullptr;
inline thread_local unsigned derive_emul_lane = 0;

template <typename T>
T derive_emul_exchange(T v, unsigned from)
{
    static_assert(sizeof(T) <= 8, "a shuffle of at most 8 bytes");
    DeriveEmulWarp &w = *derive_emul_warp;
    std::memcpy(w.slot[derive_emul_lane], &v, sizeof(T));
    w.bar.arrive_and_wait();
    T r = v;
    if (from < 32) {
        std::memcpy(&r, w.slot[from], sizeof(T));
    }
    w.bar.arrive_and_wait();
    return r;
}

template <typename T>
T __shfl_down_sync(unsigned, T v, int off)
{
    return derive_emul_exchange(v, derive_emul_lane + (unsigned)off);  /* lanes past 31 keep their own value */
}

template <typename T>
T __shfl_sync(unsigned, T v, int src)
{
    return derive_emul_exchange(v, (unsigned)src);
}

/* kernel<<<grid, block, 0, stream>>>(args) is rewritten by the test into derive_emul_launch(grid, block, lambda) */
template <typename F>
void derive_emul_launch(unsigned grid, unsigned block, F f)
{
    for (unsigned b = 0; b < grid; ++b) {
        for (unsigned w = 0; w < block / 32; ++w) {
            DeriveEmulWarp warp;
            std::vector<std::thread> lanes;
            for (unsigned l = 0; l < 32; ++l) {
                lanes.emplace_back([&, l] {
                    threadIdx = dim3(w * 32 + l);
                    blockIdx = dim3(b);
                    blockDim = dim3(block);
                    gridDim = dim3(grid);
                    derive_emul_warp = &warp;
                    derive_emul_lane = l;
                    f();
                });
            }
            for (auto &t : lanes) {
                t.join();
            }
        }
    }
}

#endif
