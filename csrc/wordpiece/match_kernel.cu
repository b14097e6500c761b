// CUDA batch kernel over matcher.h; see cuda_matcher.h.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cuda_matcher.h"

namespace fastbert {
namespace {

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

__global__ void match_words_kernel(TrieView trie, const uint8_t* bytes, const int64_t* word_ends, int64_t num_words,
                                   int32_t* ids, int32_t* counts) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= num_words) return;
  const int64_t begin = i == 0 ? 0 : word_ends[i - 1];
  counts[i] = match_word(trie, bytes + begin, int32_t(word_ends[i] - begin), ids + begin, nullptr, nullptr);
}

// A device buffer for one call, freed on scope exit.
template <typename T>
struct DeviceArray {
  T* ptr = nullptr;
  DeviceArray(const T* host, size_t n, const char* what) {
    check(cudaMalloc(&ptr, std::max<size_t>(1, n) * sizeof(T)), what);
    if (n) check(cudaMemcpy(ptr, host, n * sizeof(T), cudaMemcpyHostToDevice), what);
  }
  explicit DeviceArray(size_t n, const char* what) { check(cudaMalloc(&ptr, std::max<size_t>(1, n) * sizeof(T)), what); }
  ~DeviceArray() { cudaFree(ptr); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
};

// Copies n elements to a new device allocation recorded in `owned` (freed by ~DeviceTrie).
template <typename T>
const T* upload(std::vector<void*>& owned, const T* host, size_t n, const char* what) {
  void* ptr = nullptr;
  check(cudaMalloc(&ptr, std::max<size_t>(1, n) * sizeof(T)), what);
  owned.push_back(ptr);
  if (n) check(cudaMemcpy(ptr, host, n * sizeof(T), cudaMemcpyHostToDevice), what);
  return static_cast<const T*>(ptr);
}

}  // namespace

DeviceTrie::DeviceTrie(const Trie& trie) {
  check(cudaGetDevice(&device_), "cudaGetDevice");
  try {
    // Every pointer field of TrieView is replaced by its device copy; the scalars stay as the host view has them.
    view_ = trie.view();
    // FASTBERT_TRIE_ARRAYS (matcher.h) lists them all, so a new array cannot be left pointing at host memory.
#define FASTBERT_TRIE_DEVICE_COPY(type, name, what)                                                            \
  static_assert(sizeof(*trie.name().data()) == sizeof(type), "Trie::" #name "() and TrieView::" #name        \
                                                              " differ in element size");                     \
  view_.name = upload(owned_, reinterpret_cast<const type*>(trie.name().data()), trie.name().size(), what);
    FASTBERT_TRIE_ARRAYS(FASTBERT_TRIE_DEVICE_COPY)
#undef FASTBERT_TRIE_DEVICE_COPY
  } catch (...) {
    for (void* p : owned_) cudaFree(p);
    throw;
  }
}

DeviceTrie::~DeviceTrie() {
  int current = 0;
  cudaGetDevice(&current);
  cudaSetDevice(device_);
  for (void* p : owned_) cudaFree(p);
  cudaSetDevice(current);
}

void DeviceTrie::match(std::string_view words, const std::vector<int64_t>& word_ends, std::vector<int32_t>& ids,
                       std::vector<int32_t>& counts) const {
  int current = 0;
  check(cudaGetDevice(&current), "cudaGetDevice");
  if (current != device_) check(cudaSetDevice(device_), "cudaSetDevice");
  const int64_t num_words = static_cast<int64_t>(word_ends.size());
  const DeviceArray<uint8_t> d_bytes(reinterpret_cast<const uint8_t*>(words.data()), words.size(), "words");
  const DeviceArray<int64_t> d_ends(word_ends.data(), word_ends.size(), "word ends");
  const DeviceArray<int32_t> d_ids(words.size(), "ids");
  const DeviceArray<int32_t> d_counts(word_ends.size(), "counts");
  if (num_words > 0) {
    constexpr int kThreads = 128;
    const auto blocks = static_cast<unsigned>((num_words + kThreads - 1) / kThreads);
    match_words_kernel<<<blocks, kThreads>>>(view_, d_bytes.ptr, d_ends.ptr, num_words, d_ids.ptr, d_counts.ptr);
    check(cudaGetLastError(), "match_words_kernel launch");
    check(cudaDeviceSynchronize(), "match_words_kernel");
  }
  ids.resize(words.size());
  counts.resize(word_ends.size());
  if (!ids.empty()) check(cudaMemcpy(ids.data(), d_ids.ptr, ids.size() * sizeof(int32_t), cudaMemcpyDeviceToHost), "ids");
  if (!counts.empty()) {
    check(cudaMemcpy(counts.data(), d_counts.ptr, counts.size() * sizeof(int32_t), cudaMemcpyDeviceToHost), "counts");
  }
  if (current != device_) cudaSetDevice(current);
}

void match_words_cuda(const Trie& trie, std::string_view words, const std::vector<int64_t>& word_ends,
                      std::vector<int32_t>& ids, std::vector<int32_t>& counts) {
  DeviceTrie(trie).match(words, word_ends, ids, counts);
}

}  // namespace fastbert
