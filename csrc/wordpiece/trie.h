// Builds the LinMaxMatch trie of a vocabulary (host side) and owns its arrays; matcher.h reads them.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "matcher.h"
#include "vocab.h"

namespace fastbert {

// Nodes with more edges than this get a 256-entry child table instead of a scan (the root, the "##" node and
// the first bytes of common prefixes: a few hundred nodes in BERT's vocabulary).
inline constexpr size_t kDenseFanout = 8;

// Each node's edges (byte, child), as the trie is built before it is flattened.
using TrieEdgeLists = std::vector<std::vector<std::pair<uint8_t, int32_t>>>;

class Trie {
 public:
  // `marker` is the continuation prefix ("##"); `unk_id` the id emitted for unmatchable words.
  Trie(const Vocab& vocab, const std::string& marker, int32_t unk_id, int32_t max_chars);
  Trie(const Trie&) = delete;
  Trie& operator=(const Trie&) = delete;

  // Pointers into this object's vectors: valid while the Trie lives.
  const TrieView& view() const { return view_; }
  int32_t num_nodes() const { return static_cast<int32_t>(fail_.size()); }

  // The arrays, for copying to a device.
  const std::vector<int32_t>& edge_begin() const { return edge_begin_; }
  const std::vector<uint8_t>& edge_label() const { return edge_label_; }
  const std::vector<int32_t>& edge_child() const { return edge_child_; }
  const std::vector<int32_t>& dense_slot() const { return dense_slot_; }
  const std::vector<int32_t>& dense() const { return dense_; }
  const std::vector<int32_t>& node_token() const { return node_token_; }
  const std::vector<int32_t>& fail() const { return fail_; }
  const std::vector<int32_t>& pops_begin() const { return pops_begin_; }
  const std::vector<int32_t>& pops() const { return pops_; }
  const std::vector<int32_t>& token_bytes() const { return token_bytes_; }
  const std::vector<int32_t>& word_slots() const { return word_slots_; }
  const std::vector<int64_t>& token_start() const { return token_start_; }
  const std::string& token_chars() const { return token_chars_; }
  const std::string& marker() const { return marker_; }

 private:
  // The construction's steps that fill members; trie.cc has the others.
  void flatten_edges(const TrieEdgeLists& children);
  void build_dense_tables(const TrieEdgeLists& children);
  uint32_t build_word_table(const Vocab& vocab);  // returns the slot mask

  std::string marker_;
  std::vector<int32_t> edge_begin_, edge_child_, dense_slot_, dense_, node_token_, fail_, pops_begin_, pops_,
      token_bytes_, word_slots_;
  std::vector<int64_t> token_start_;
  std::string token_chars_;
  std::vector<uint8_t> edge_label_;
  TrieView view_{};
};

}  // namespace fastbert
