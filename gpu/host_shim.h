// Host shim: compile sortpool_kernels.cu as ordinary C++ and run it on the CPU.
//
//     g++ -std=c++17 -DSORTPOOL_HOST -include host_shim.h sortpool_kernels.cu
//
// The CUDA launch model is reduced to what the kernels use: a 1-D grid of
// 1-D blocks, each (block, thread) pair run in turn by one host thread. This
// is exact for them because they use no shared memory, barriers or atomics
// (every step of their grid-stride loops is independent). A launch receives
// its arguments as cuLaunchKernel does, an array of pointers to each
// argument, so a ctypes caller passes exactly the C types the kernel
// declares.
#ifndef SORTPOOL_HOST_SHIM_H
#define SORTPOOL_HOST_SHIM_H

#include <cmath>
#include <cstddef>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

using std::exp;

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

namespace sortpool_host {
inline dim3 grid_dim, block_dim, block_idx, thread_idx;
}  // namespace sortpool_host

#define gridDim (::sortpool_host::grid_dim)
#define blockDim (::sortpool_host::block_dim)
#define blockIdx (::sortpool_host::block_idx)
#define threadIdx (::sortpool_host::thread_idx)

namespace sortpool_host {

template <typename... A, std::size_t... I>
void call_with(void (*kernel)(A...), void** params,
               std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<A>*>(params[I])...);
}

// Run `kernel` as a launch of `grid` blocks of `block` threads.
template <typename... A>
void launch(void (*kernel)(A...), unsigned int grid, unsigned int block,
            void** params) {
    grid_dim = dim3{grid, 1, 1};
    block_dim = dim3{block, 1, 1};
    for (unsigned int b = 0; b < grid; ++b) {
        for (unsigned int t = 0; t < block; ++t) {
            block_idx = dim3{b, 0, 0};
            thread_idx = dim3{t, 0, 0};
            call_with(kernel, params, std::index_sequence_for<A...>{});
        }
    }
}

}  // namespace sortpool_host

// One C entry point per kernel instantiation, named for ctypes.
#define SORTPOOL_HOST_ENTRY(symbol, ...)                                    \
    extern "C" void symbol(unsigned int grid, unsigned int block,           \
                           void** params) {                                 \
        ::sortpool_host::launch(&__VA_ARGS__, grid, block, params);         \
    }

#endif  // SORTPOOL_HOST_SHIM_H
