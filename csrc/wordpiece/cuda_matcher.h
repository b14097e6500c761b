// The GPU batch matcher: pre-normalized words (UTF-8 bytes back to back + end offsets) to ids, one word per
// thread, running the same matcher.h code as the CPU encoder. Compiled only when nvcc is found
// (FASTBERT_WITH_CUDA); the trie is copied to the device on every call, which suits batches of many words.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "trie.h"

namespace fastbert {

// ids gets, for word i, counts[i] ids starting at the word's first byte offset (each word yields at most one id
// per byte). Throws std::runtime_error naming the failing CUDA call.
void match_words_cuda(const Trie& trie, std::string_view words, const std::vector<int64_t>& word_ends,
                      std::vector<int32_t>& ids, std::vector<int32_t>& counts);

}  // namespace fastbert
