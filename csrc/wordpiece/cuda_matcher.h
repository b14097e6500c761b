// The GPU batch matcher: pre-normalized words (UTF-8 bytes back to back + end offsets) to ids, one word per
// thread, running the same matcher.h code as the CPU encoder. Compiled only when nvcc is found
// (FASTBERT_WITH_CUDA). A DeviceTrie copies a tokenizer's trie to the current device once; every match after that
// uploads only the words.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "matcher.h"
#include "trie.h"

namespace fastbert {

class DeviceTrie {
 public:
  // Copies every array of `trie` to the current CUDA device. Throws std::runtime_error naming the failing call.
  explicit DeviceTrie(const Trie& trie);
  ~DeviceTrie();
  DeviceTrie(const DeviceTrie&) = delete;
  DeviceTrie& operator=(const DeviceTrie&) = delete;

  // ids gets, for word i, counts[i] ids starting at the word's first byte offset (each word yields at most one id
  // per byte).
  void match(std::string_view words, const std::vector<int64_t>& word_ends, std::vector<int32_t>& ids,
             std::vector<int32_t>& counts) const;

  int device() const { return device_; }

 private:
  TrieView view_{};
  std::vector<void*> owned_;
  int device_ = 0;
};

// One-off: uploads the trie, matches, frees it.
void match_words_cuda(const Trie& trie, std::string_view words, const std::vector<int64_t>& word_ends,
                      std::vector<int32_t>& ids, std::vector<int32_t>& counts);

}  // namespace fastbert
