// LinMaxMatch trie construction; see trie.h and matcher.h.
#include "trie.h"

#include <algorithm>
#include <deque>
#include <utility>

namespace fastbert {

Trie::Trie(const Vocab& vocab, const std::string& marker, int32_t unk_id, int32_t max_chars) : marker_(marker) {
  // Insert every token into a pointer-free trie with per-node edge lists, then flatten.
  std::vector<std::vector<std::pair<uint8_t, int32_t>>> children(1);
  std::vector<int32_t> parent(1, -1);
  std::vector<uint8_t> label(1, 0);
  node_token_.assign(1, -1);
  auto child_of = [&](int32_t node, uint8_t byte) -> int32_t {
    for (const auto& [b, c] : children[node]) {
      if (b == byte) return c;
    }
    return -1;
  };
  auto insert = [&](const std::string& s) -> int32_t {
    int32_t node = 0;
    for (unsigned char byte : s) {
      int32_t next = child_of(node, byte);
      if (next < 0) {
        next = static_cast<int32_t>(children.size());
        children[node].emplace_back(byte, next);
        children.emplace_back();
        parent.push_back(node);
        label.push_back(byte);
        node_token_.push_back(-1);
      }
      node = next;
    }
    return node;
  };
  token_bytes_.resize(vocab.size());
  for (int32_t id = 0; id < vocab.size(); ++id) {
    const std::string& token = vocab.id_to_token(id);
    node_token_[insert(token)] = id;
    const bool continues = token.size() > marker.size() && token.compare(0, marker.size(), marker) == 0;
    token_bytes_[id] = static_cast<int32_t>(token.size() - (continues ? marker.size() : 0));
  }
  const int32_t suffix_root = insert(marker);
  const int32_t num_nodes = static_cast<int32_t>(children.size());
  for (auto& edges : children) std::sort(edges.begin(), edges.end());

  // Failure links and pops. A failure chain from a node spelling "##x" only reaches nodes spelling a shorter
  // "##y", and one from a word-initial node reaches only "##" nodes, so the marker's subtree is finished
  // breadth-first before the rest of the trie.
  fail_.assign(num_nodes, -1);
  std::vector<std::vector<int32_t>> pops(num_nodes);
  auto compute = [&](int32_t v) {
    const int32_t u = parent[v];
    if (v == suffix_root) return;  // the empty continuation: nothing to emit, nowhere to go
    if (node_token_[v] >= 0) {
      pops[v] = {node_token_[v]};
      fail_[v] = suffix_root;
      return;
    }
    pops[v] = pops[u];
    int32_t z = fail_[u];
    while (z >= 0 && child_of(z, label[v]) < 0) {
      pops[v].insert(pops[v].end(), pops[z].begin(), pops[z].end());
      z = fail_[z];
    }
    fail_[v] = z >= 0 ? child_of(z, label[v]) : -1;
  };
  auto breadth_first = [&](int32_t start, int32_t skip) {
    std::deque<int32_t> queue{start};
    while (!queue.empty()) {
      const int32_t v = queue.front();
      queue.pop_front();
      if (v != 0) compute(v);
      for (const auto& edge : children[v]) {
        if (edge.second != skip) queue.push_back(edge.second);
      }
    }
  };
  breadth_first(suffix_root, -1);
  breadth_first(0, suffix_root);

  edge_begin_.reserve(num_nodes + 1);
  pops_begin_.reserve(num_nodes + 1);
  for (int32_t v = 0; v < num_nodes; ++v) {
    edge_begin_.push_back(static_cast<int32_t>(edge_label_.size()));
    for (const auto& [b, c] : children[v]) {
      edge_label_.push_back(b);
      edge_child_.push_back(c);
    }
    pops_begin_.push_back(static_cast<int32_t>(pops_.size()));
    pops_.insert(pops_.end(), pops[v].begin(), pops[v].end());
  }
  edge_begin_.push_back(static_cast<int32_t>(edge_label_.size()));
  pops_begin_.push_back(static_cast<int32_t>(pops_.size()));
  dense_slot_.assign(num_nodes, -1);
  for (int32_t v = 0; v < num_nodes; ++v) {
    if (children[v].size() <= kDenseFanout) continue;
    dense_slot_[v] = static_cast<int32_t>(dense_.size() / 256);
    dense_.resize(dense_.size() + 256, -1);
    for (const auto& [b, c] : children[v]) dense_[dense_slot_[v] * 256 + b] = c;
  }

  size_t slots = 1;
  while (slots < 2 * static_cast<size_t>(vocab.size())) slots *= 2;
  word_slots_.assign(slots, -1);
  token_start_.reserve(vocab.size() + 1);
  for (int32_t id = 0; id < vocab.size(); ++id) {
    const std::string& token = vocab.id_to_token(id);
    token_start_.push_back(static_cast<int64_t>(token_chars_.size()));
    token_chars_ += token;
    uint32_t slot = hash_bytes(reinterpret_cast<const uint8_t*>(token.data()), static_cast<int32_t>(token.size()));
    while (word_slots_[slot & (slots - 1)] >= 0) ++slot;
    word_slots_[slot & (slots - 1)] = id;
  }
  token_start_.push_back(static_cast<int64_t>(token_chars_.size()));

  // The member holding each array must have elements of the view's type (strings hold the byte arrays).
#define FASTBERT_TRIE_HOST_VIEW(type, name, what)                                                    \
  static_assert(sizeof(*name##_.data()) == sizeof(type), "Trie::" #name "_ and TrieView::" #name \
                                                          " differ in element size");               \
  view_.name = reinterpret_cast<const type*>(name##_.data());
  FASTBERT_TRIE_ARRAYS(FASTBERT_TRIE_HOST_VIEW)
#undef FASTBERT_TRIE_HOST_VIEW
  view_.word_slot_mask = static_cast<uint32_t>(slots - 1);
  view_.marker_len = static_cast<int32_t>(marker_.size());
  view_.root = 0;
  view_.suffix_root = suffix_root;
  view_.unk_id = unk_id;
  view_.max_chars = max_chars;
}

}  // namespace fastbert
