// Philox4x32-10 (Salmon et al., SC'11), a counter-based generator: the output
// is a pure function of (counter, key), so random values are recomputed where
// they are needed instead of being stored, identically on the host and the
// device. memfast/reference/curvature.py implements the same function with
// int64 torch ops; tests check both against the Random123 known answers.
//
// Curvature probes use it as follows (one call gives 128 probe signs):
//   key     = (low 32 bits of seed, high 32 bits of seed)
//   counter = (element block j, sample b, probe k, 0)
//   element e of that sample's input (flattened), with j = e / 128 and
//   i = e % 128, has sign bit (word[i / 32] >> (i % 32)) & 1: 1 -> +1, 0 -> -1.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MEMFAST_HOST_DEVICE __host__ __device__ __forceinline__
#define MEMFAST_UNROLL_ROUNDS _Pragma("unroll")
#else
#define MEMFAST_HOST_DEVICE inline
#define MEMFAST_UNROLL_ROUNDS _Pragma("GCC unroll 10")
#endif

namespace memfast {

constexpr uint32_t PHILOX_M0 = 0xD2511F53u;
constexpr uint32_t PHILOX_M1 = 0xCD9E8D57u;
constexpr uint32_t PHILOX_W0 = 0x9E3779B9u;
constexpr uint32_t PHILOX_W1 = 0xBB67AE85u;
// Probe signs per generator call (4 words of 32 bits).
constexpr int64_t PROBE_BLOCK = 128;

struct Philox4 {
  uint32_t w[4];
};

MEMFAST_HOST_DEVICE uint32_t philox_mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

MEMFAST_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                          uint32_t k1) {
  MEMFAST_UNROLL_ROUNDS
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = philox_mulhi(PHILOX_M0, c0), lo0 = PHILOX_M0 * c0;
    const uint32_t hi1 = philox_mulhi(PHILOX_M1, c2), lo1 = PHILOX_M1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += PHILOX_W0;
    k1 += PHILOX_W1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The 128 probe signs of element block `block` of sample `sample`, probe `probe`.
MEMFAST_HOST_DEVICE Philox4 probe_signs(int64_t seed, int64_t sample, int64_t probe, int64_t block) {
  const uint64_t s = static_cast<uint64_t>(seed);
  return philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(sample), static_cast<uint32_t>(probe), 0u,
                       static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
}

}  // namespace memfast
