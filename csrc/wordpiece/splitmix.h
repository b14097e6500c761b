// SplitMix64: the hash behind every random draw of the data pipeline (segment pairs, masking), so that a draw
// depends only on what it is for, never on a generator's position. Its Python twin, fastbert/data/splitmix.py, is
// what the Python definitions (fastbert.data.prepare, fastbert.data.masking) use; they compute the same values.
#pragma once

#include <cstdint>

namespace fastbert {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;  // 2^64 / golden ratio: SplitMix64's increment

// SplitMix64's finaliser: a bijective avalanche mix.
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ULL;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// The top 53 bits of a hash as a double in [0, 1).
inline double unit_interval(uint64_t h) { return static_cast<double>(h >> 11) * 0x1.0p-53; }

}  // namespace fastbert
