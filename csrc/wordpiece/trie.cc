// LinMaxMatch trie construction; see trie.h and matcher.h.
#include "trie.h"

#include <algorithm>
#include <deque>
#include <utility>

namespace fastbert {
namespace {

// The vocabulary's tokens as a pointer-free trie with an edge list per node, before it is flattened.
struct PrefixTree {
  TrieEdgeLists children = TrieEdgeLists(1);
  std::vector<int32_t> parent = std::vector<int32_t>(1, -1);
  std::vector<uint8_t> label = std::vector<uint8_t>(1, 0);
  std::vector<int32_t> token = std::vector<int32_t>(1, -1);  // the id of the token a node spells, or -1

  int32_t size() const { return static_cast<int32_t>(children.size()); }

  int32_t child(int32_t node, uint8_t byte) const {
    for (const auto& [b, c] : children[node]) {
      if (b == byte) return c;
    }
    return -1;
  }

  // The node spelling s, made (with the nodes on its way) when missing.
  int32_t insert(const std::string& s) {
    int32_t node = 0;
    for (unsigned char byte : s) {
      int32_t next = child(node, byte);
      if (next < 0) {
        next = size();
        children[node].emplace_back(byte, next);
        children.emplace_back();
        parent.push_back(node);
        label.push_back(byte);
        token.push_back(-1);
      }
      node = next;
    }
    return node;
  }
};

// Every token inserted, then the marker; returns the marker's node (the root of continuations). Edges end sorted.
int32_t insert_vocabulary(const Vocab& vocab, const std::string& marker, PrefixTree& tree) {
  for (int32_t id = 0; id < vocab.size(); ++id) tree.token[tree.insert(vocab.id_to_token(id))] = id;
  const int32_t suffix_root = tree.insert(marker);
  for (auto& edges : tree.children) std::sort(edges.begin(), edges.end());
  return suffix_root;
}

// Each token's length in bytes, without the marker when it is a continuation.
std::vector<int32_t> token_lengths_without_marker(const Vocab& vocab, const std::string& marker) {
  std::vector<int32_t> lengths(vocab.size());
  for (int32_t id = 0; id < vocab.size(); ++id) {
    const std::string& token = vocab.id_to_token(id);
    const bool continues = token.size() > marker.size() && token.compare(0, marker.size(), marker) == 0;
    lengths[id] = static_cast<int32_t>(token.size() - (continues ? marker.size() : 0));
  }
  return lengths;
}

// Failure links (into `fail`) and the tokens each node pops (returned). A failure chain from a node spelling "##x"
// only reaches nodes spelling a shorter "##y", and one from a word-initial node reaches only "##" nodes, so the
// marker's subtree is finished breadth-first before the rest of the trie.
std::vector<std::vector<int32_t>> failure_links(const PrefixTree& tree, int32_t suffix_root,
                                                std::vector<int32_t>& fail) {
  fail.assign(tree.size(), -1);
  std::vector<std::vector<int32_t>> pops(tree.size());
  auto compute = [&](int32_t v) {
    const int32_t u = tree.parent[v];
    if (v == suffix_root) return;  // the empty continuation: nothing to emit, nowhere to go
    if (tree.token[v] >= 0) {
      pops[v] = {tree.token[v]};
      fail[v] = suffix_root;
      return;
    }
    pops[v] = pops[u];
    int32_t z = fail[u];
    while (z >= 0 && tree.child(z, tree.label[v]) < 0) {
      pops[v].insert(pops[v].end(), pops[z].begin(), pops[z].end());
      z = fail[z];
    }
    fail[v] = z >= 0 ? tree.child(z, tree.label[v]) : -1;
  };
  auto breadth_first = [&](int32_t start, int32_t skip) {
    std::deque<int32_t> queue{start};
    while (!queue.empty()) {
      const int32_t v = queue.front();
      queue.pop_front();
      if (v != 0) compute(v);
      for (const auto& edge : tree.children[v]) {
        if (edge.second != skip) queue.push_back(edge.second);
      }
    }
  };
  breadth_first(suffix_root, -1);
  breadth_first(0, suffix_root);
  return pops;
}

// Per-node lists back to back: list v is items[begin[v] .. begin[v + 1]).
template <typename List, typename Item>
void flatten_lists(const std::vector<List>& lists, std::vector<int32_t>& begin, std::vector<Item>& items) {
  begin.reserve(lists.size() + 1);
  for (const auto& list : lists) {
    begin.push_back(static_cast<int32_t>(items.size()));
    items.insert(items.end(), list.begin(), list.end());
  }
  begin.push_back(static_cast<int32_t>(items.size()));
}

}  // namespace

Trie::Trie(const Vocab& vocab, const std::string& marker, int32_t unk_id, int32_t max_chars) : marker_(marker) {
  PrefixTree tree;
  const int32_t suffix_root = insert_vocabulary(vocab, marker, tree);
  token_bytes_ = token_lengths_without_marker(vocab, marker);
  flatten_lists(failure_links(tree, suffix_root, fail_), pops_begin_, pops_);
  flatten_edges(tree.children);
  build_dense_tables(tree.children);
  const uint32_t word_slot_mask = build_word_table(vocab);
  node_token_ = std::move(tree.token);

  // The member holding each array must have elements of the view's type (strings hold the byte arrays).
#define FASTBERT_TRIE_HOST_VIEW(type, name, what)                                                    \
  static_assert(sizeof(*name##_.data()) == sizeof(type), "Trie::" #name "_ and TrieView::" #name \
                                                          " differ in element size");               \
  view_.name = reinterpret_cast<const type*>(name##_.data());
  FASTBERT_TRIE_ARRAYS(FASTBERT_TRIE_HOST_VIEW)
#undef FASTBERT_TRIE_HOST_VIEW
  view_.word_slot_mask = word_slot_mask;
  view_.marker_len = static_cast<int32_t>(marker_.size());
  view_.root = 0;
  view_.suffix_root = suffix_root;
  view_.unk_id = unk_id;
  view_.max_chars = max_chars;
}

void Trie::flatten_edges(const TrieEdgeLists& children) {
  edge_begin_.reserve(children.size() + 1);
  for (const auto& edges : children) {
    edge_begin_.push_back(static_cast<int32_t>(edge_label_.size()));
    for (const auto& [b, c] : edges) {
      edge_label_.push_back(b);
      edge_child_.push_back(c);
    }
  }
  edge_begin_.push_back(static_cast<int32_t>(edge_label_.size()));
}

void Trie::build_dense_tables(const TrieEdgeLists& children) {
  dense_slot_.assign(children.size(), -1);
  for (size_t v = 0; v < children.size(); ++v) {
    if (children[v].size() <= kDenseFanout) continue;
    dense_slot_[v] = static_cast<int32_t>(dense_.size() / 256);
    dense_.resize(dense_.size() + 256, -1);
    for (const auto& [b, c] : children[v]) dense_[dense_slot_[v] * 256 + b] = c;
  }
}

uint32_t Trie::build_word_table(const Vocab& vocab) {
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
  return static_cast<uint32_t>(slots - 1);
}

}  // namespace fastbert
