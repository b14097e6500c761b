// CUDA batch kernel over matcher.h; see cuda_matcher.h.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda_matcher.h"
#include "matcher.h"

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

// Device copies of a host vector, freed on scope exit.
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

template <typename T>
DeviceArray<T> upload(const std::vector<T>& v, const char* what) {
  return DeviceArray<T>(v.data(), v.size(), what);
}

}  // namespace

void match_words_cuda(const Trie& trie, std::string_view words, const std::vector<int64_t>& word_ends,
                      std::vector<int32_t>& ids, std::vector<int32_t>& counts) {
  const auto edge_begin = upload(trie.edge_begin(), "trie edges");
  const auto edge_label = upload(trie.edge_label(), "trie labels");
  const auto edge_child = upload(trie.edge_child(), "trie children");
  const auto dense_slot = upload(trie.dense_slot(), "trie dense slots");
  const auto dense = upload(trie.dense(), "trie dense rows");
  const auto node_token = upload(trie.node_token(), "trie tokens");
  const auto fail = upload(trie.fail(), "trie failure links");
  const auto pops_begin = upload(trie.pops_begin(), "trie pops");
  const auto pops = upload(trie.pops(), "trie pops");
  const auto token_bytes = upload(trie.token_bytes(), "token lengths");
  const auto word_slots = upload(trie.word_slots(), "whole-word table");
  const auto token_start = upload(trie.token_start(), "token offsets");
  const DeviceArray<uint8_t> token_chars(reinterpret_cast<const uint8_t*>(trie.token_chars().data()),
                                         trie.token_chars().size(), "token bytes");
  const DeviceArray<uint8_t> marker(reinterpret_cast<const uint8_t*>(trie.marker().data()), trie.marker().size(),
                                    "marker");
  TrieView view = trie.view();
  view.edge_begin = edge_begin.ptr;
  view.edge_label = edge_label.ptr;
  view.edge_child = edge_child.ptr;
  view.dense_slot = dense_slot.ptr;
  view.dense = dense.ptr;
  view.node_token = node_token.ptr;
  view.fail = fail.ptr;
  view.pops_begin = pops_begin.ptr;
  view.pops = pops.ptr;
  view.token_bytes = token_bytes.ptr;
  view.word_slots = word_slots.ptr;
  view.token_start = token_start.ptr;
  view.token_chars = token_chars.ptr;
  view.marker = marker.ptr;

  const int64_t num_words = static_cast<int64_t>(word_ends.size());
  const DeviceArray<uint8_t> d_bytes(reinterpret_cast<const uint8_t*>(words.data()), words.size(), "words");
  const DeviceArray<int64_t> d_ends(word_ends.data(), word_ends.size(), "word ends");
  const DeviceArray<int32_t> d_ids(words.size(), "ids");
  const DeviceArray<int32_t> d_counts(word_ends.size(), "counts");
  if (num_words > 0) {
    constexpr int kThreads = 128;
    const auto blocks = static_cast<unsigned>((num_words + kThreads - 1) / kThreads);
    match_words_kernel<<<blocks, kThreads>>>(view, d_bytes.ptr, d_ends.ptr, num_words, d_ids.ptr, d_counts.ptr);
    check(cudaGetLastError(), "match_words_kernel launch");
    check(cudaDeviceSynchronize(), "match_words_kernel");
  }
  ids.resize(words.size());
  counts.resize(word_ends.size());
  if (!ids.empty()) check(cudaMemcpy(ids.data(), d_ids.ptr, ids.size() * sizeof(int32_t), cudaMemcpyDeviceToHost), "ids");
  if (!counts.empty()) {
    check(cudaMemcpy(counts.data(), d_counts.ptr, counts.size() * sizeof(int32_t), cudaMemcpyDeviceToHost), "counts");
  }
}

}  // namespace fastbert
