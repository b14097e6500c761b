// BERT's tokenizer end to end on the CPU: special-token splitting, basic tokenization (clean text, CJK spacing,
// lowercase + NFD + accent stripping when uncased, whitespace and punctuation splitting) in one pass over the
// UTF-8 text, each word handed to the shared matcher as soon as it ends, and the batch encoder over threads.
//
// Character facts come from the generated unicode_tables.inc. Offsets are code point indices into the original
// text, as Python strings count them. Invalid UTF-8 is the caller's to reject (find_invalid_utf8 in vocab.h).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "trie.h"
#include "vocab.h"

namespace fastbert {

struct Encoding {
  std::vector<int32_t> ids;
  std::vector<int32_t> offsets;  // 2 per id: [start, end) in code points, filled only when asked for
};

class Tokenizer {
 public:
  // `special_tokens` are matched verbatim in the raw text and never split; they, `unk`, `cls` and `sep` must be
  // in the vocabulary (a VocabError names the missing one).
  Tokenizer(Vocab vocab, bool lowercase, const std::vector<std::string>& special_tokens, const std::string& unk,
            const std::string& cls, const std::string& sep, int32_t max_chars_per_word = 100,
            const std::string& marker = "##");

  // Appends the ids of `text` (no [CLS]/[SEP] added), and their offsets when with_offsets.
  void encode(std::string_view text, Encoding& out, bool with_offsets) const;

  // Normalizes and splits `text` into words without matching them, appending the words' UTF-8 bytes back to
  // back to `bytes`, the end of each word to `word_ends` and, per word, the special token's id or -1 to
  // `special_ids` (a special token appears as a word spelled like itself). This is what the GPU matcher consumes.
  void split_words(std::string_view text, std::string& bytes, std::vector<int64_t>& word_ends,
                   std::vector<int32_t>& special_ids) const;

  // Appends the ids of `text` (and `pair` when not null) to `ids`; with add_special_tokens, as
  // [CLS] text [SEP] (pair [SEP]).
  void encode_ids(std::string_view text, const std::string_view* pair, bool add_special_tokens,
                  std::vector<int32_t>& ids) const;

  const Vocab& vocab() const { return vocab_; }
  const Trie& trie() const { return *trie_; }
  bool lowercase() const { return lowercase_; }
  int32_t cls_id() const { return cls_id_; }
  int32_t sep_id() const { return sep_id_; }

 private:
  template <typename WordSink, typename SpecialSink>
  void walk(std::string_view text, bool with_origins, WordSink&& on_word, SpecialSink&& on_special) const;
  template <typename Flush, typename Visit>
  void walk_non_ascii(uint32_t cp, const uint8_t* bytes, size_t len, int32_t origin, Flush& flush,
                      Visit& visit) const;
  int32_t match_special(const uint8_t* p, size_t n, size_t* len) const;

  Vocab vocab_;
  bool lowercase_;
  std::unique_ptr<Trie> trie_;
  std::vector<std::pair<std::string, int32_t>> specials_;  // longest first
  bool special_first_byte_[256] = {};
  uint8_t ascii_flags_[128] = {};  // the tables' flags and (uncased) mapping of ASCII, for the fast path
  char ascii_mapped_[128] = {};
  int32_t cls_id_ = -1, sep_id_ = -1;
};

}  // namespace fastbert
