// WordPiece matching of one pre-normalized word, shared by the CPU encoder and the CUDA kernel.
//
// The vocabulary lives in a byte trie with LinMaxMatch failure links (Song et al., "Fast WordPiece Tokenization",
// 2021): for a trie node v, fail[v] is the node to continue from after the longest-match tokens pops[v] have been
// emitted because the word cannot be extended from v. Every byte of the word is then consumed once and every
// failure step emits at least one token, so a word of n bytes costs O(n) steps instead of the O(n^2) substring
// lookups of BERT's reference greedy loop, with identical output (longest match first, "##" continuations, the
// whole word becomes [UNK] when any part of it cannot be matched).
//
// This header owns only the matching: the flat, pointer-only TrieView (copyable to the GPU) and the functions
// over it. Building the trie is trie.h; normalization and word splitting are tokenizer.h.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTBERT_HD __host__ __device__
#else
#define FASTBERT_HD
#endif

namespace fastbert {

// Every array of the trie, listed once as X(element type, name, what it is for error messages). The TrieView
// struct below, the host view (Trie's constructor, trie.cc: from the Trie member `name_`) and the device copy
// (DeviceTrie, match_kernel.cu: from the accessor `trie.name()`) all expand this list, so an array added here
// reaches each of them, and one without its Trie member or accessor does not compile.
//   edge_begin   [num_nodes + 1]: node v's edges are edge_begin[v] .. edge_begin[v + 1]
//   edge_label   sorted by label within a node
//   dense_slot   [num_nodes]: -1, or the node's row in `dense` (nodes with many edges)
//   dense        256 children (or -1) per row
//   node_token   the vocab id spelled by the path to the node, or -1
//   fail         failure link, -1 for none
//   pops_begin   [num_nodes + 1]: ids emitted when following fail[v] are pops[pops_begin[v] .. pops_begin[v + 1])
//   token_bytes  [vocab size]: bytes of the word a token covers (its length less any marker)
//   word_slots   open-addressing hash of every token's bytes -> id (-1 empty), see whole_word_id
//   token_start  [vocab size + 1]: token i is token_chars[token_start[i] .. token_start[i + 1])
//   marker       the continuation marker, "##"
#define FASTBERT_TRIE_ARRAYS(X)                  \
  X(int32_t, edge_begin, "trie edges")           \
  X(uint8_t, edge_label, "trie labels")          \
  X(int32_t, edge_child, "trie children")        \
  X(int32_t, dense_slot, "trie dense slots")     \
  X(int32_t, dense, "trie dense rows")           \
  X(int32_t, node_token, "trie tokens")          \
  X(int32_t, fail, "trie failure links")         \
  X(int32_t, pops_begin, "trie pops")            \
  X(int32_t, pops, "trie pops")                  \
  X(int32_t, token_bytes, "token lengths")       \
  X(int32_t, word_slots, "whole-word table")     \
  X(int64_t, token_start, "token offsets")       \
  X(uint8_t, token_chars, "token bytes")         \
  X(uint8_t, marker, "marker")

struct TrieView {
#define FASTBERT_TRIE_VIEW_FIELD(type, name, what) const type* name;
  FASTBERT_TRIE_ARRAYS(FASTBERT_TRIE_VIEW_FIELD)
#undef FASTBERT_TRIE_VIEW_FIELD
  uint32_t word_slot_mask;  // number of word_slots - 1 (a power of two)
  int32_t marker_len;
  int32_t root;
  int32_t suffix_root;  // the node spelled by the marker
  int32_t unk_id;
  int32_t max_chars;    // words with more characters than this become [UNK]
};

FASTBERT_HD inline int32_t trie_child(const TrieView& t, int32_t node, uint8_t byte) {
  const int32_t slot = t.dense_slot[node];
  if (slot >= 0) return t.dense[slot * 256 + byte];
  for (int32_t e = t.edge_begin[node]; e < t.edge_begin[node + 1]; ++e) {
    if (t.edge_label[e] == byte) return t.edge_child[e];
  }
  return -1;
}

FASTBERT_HD inline uint32_t hash_bytes(const uint8_t* p, int32_t len) {  // FNV-1a
  uint32_t h = 2166136261u;
  for (int32_t i = 0; i < len; ++i) h = (h ^ p[i]) * 16777619u;
  return h;
}

// The id of the token spelled exactly by the word, or -1. Longest-match-first takes the whole word whenever it
// is a token, so this one lookup settles most words of running text before any trie walk.
FASTBERT_HD inline int32_t whole_word_id(const TrieView& t, const uint8_t* word, int32_t len) {
  for (uint32_t slot = hash_bytes(word, len) & t.word_slot_mask;; slot = (slot + 1) & t.word_slot_mask) {
    const int32_t id = t.word_slots[slot];
    if (id < 0) return -1;
    const int64_t start = t.token_start[id];
    if (t.token_start[id + 1] - start != len) continue;
    int32_t k = 0;
    while (k < len && t.token_chars[start + k] == word[k]) ++k;
    if (k == len) return id;
  }
}

FASTBERT_HD inline bool contains_marker(const TrieView& t, const uint8_t* word, int32_t len) {
  for (int32_t i = 0; i + t.marker_len <= len; ++i) {
    int32_t k = 0;
    while (k < t.marker_len && word[i + k] == t.marker[k]) ++k;
    if (k == t.marker_len) return true;
  }
  return false;
}

// BERT's greedy longest-match-first, walking the trie from each token start. Quadratic in the worst case; used
// only for words that contain the continuation marker themselves, where a word-initial "##x" must match the
// vocabulary string "##x" as BERT's substring lookup does, and by tests as an independent oracle.
FASTBERT_HD inline int32_t match_word_greedy(const TrieView& t, const uint8_t* word, int32_t len, int32_t* out,
                                             int32_t* ends) {
  int32_t count = 0, start = 0;
  while (start < len) {
    int32_t node = start == 0 ? t.root : t.suffix_root;
    int32_t best_id = -1, best_end = -1;
    for (int32_t i = start; i < len && node >= 0; ++i) {
      node = trie_child(t, node, word[i]);
      if (node >= 0 && t.node_token[node] >= 0) {
        best_id = t.node_token[node];
        best_end = i + 1;
      }
    }
    if (best_id < 0) {
      out[0] = t.unk_id;
      if (ends) ends[0] = len;
      return 1;
    }
    out[count] = best_id;
    if (ends) ends[count] = best_end;
    ++count;
    start = best_end;
  }
  return count;
}

// Writes the ids of `word` (UTF-8, already normalized and split by the basic tokenizer) to out and returns their
// number; out (and ends, if not null: the end byte of each token in the word) must hold max(1, len) entries.
// steps, if not null, is incremented by the number of trie transitions and failure steps taken.
FASTBERT_HD inline int32_t match_word(const TrieView& t, const uint8_t* word, int32_t len, int32_t* out,
                                      int32_t* ends, int64_t* steps) {
  if (len == 0) return 0;
  int32_t chars = 0;
  for (int32_t i = 0; i < len; ++i) chars += (word[i] & 0xC0) != 0x80;
  if (chars > t.max_chars) {
    out[0] = t.unk_id;
    if (ends) ends[0] = len;
    return 1;
  }
  const int32_t whole = whole_word_id(t, word, len);
  if (whole >= 0) {
    out[0] = whole;
    if (ends) ends[0] = len;
    return 1;
  }
  if (contains_marker(t, word, len)) return match_word_greedy(t, word, len, out, ends);

  int32_t count = 0, pos = 0;  // pos: end of the last emitted token
  int64_t taken = 0;
  auto emit_pops = [&](int32_t node) {
    for (int32_t k = t.pops_begin[node]; k < t.pops_begin[node + 1]; ++k) {
      const int32_t id = t.pops[k];
      pos += t.token_bytes[id];
      out[count] = id;
      if (ends) ends[count] = pos;
      ++count;
    }
  };
  int32_t node = t.root;
  bool unknown = false;
  for (int32_t i = 0; i < len && !unknown; ++i) {
    int32_t next;
    while ((next = trie_child(t, node, word[i])) < 0) {
      ++taken;
      if (t.fail[node] < 0) {
        unknown = true;
        break;
      }
      emit_pops(node);
      node = t.fail[node];
    }
    ++taken;
    node = next;
  }
  while (!unknown && node != t.suffix_root) {
    ++taken;
    if (t.fail[node] < 0) {
      unknown = true;
      break;
    }
    emit_pops(node);
    node = t.fail[node];
  }
  if (steps) *steps += taken;
  if (unknown) {
    out[0] = t.unk_id;
    if (ends) ends[0] = len;
    return 1;
  }
  return count;
}

}  // namespace fastbert
