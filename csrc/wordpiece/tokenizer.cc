// The CPU tokenizer and batch encoder; see tokenizer.h.
#include "tokenizer.h"

#include <algorithm>
#include <stdexcept>

#include "unicode_tables.inc"

namespace fastbert {
namespace {

inline uint8_t char_flags(uint32_t cp) {
  return unicode::kFlagBlocks[unicode::kFlagIndex[cp >> 8] * 256u + (cp & 255u)];
}

inline uint16_t uncased_entry(uint32_t cp) {
  return unicode::kMapBlocks[unicode::kMapIndex[cp >> 8] * 256u + (cp & 255u)];
}

// Decodes the code point at p (valid UTF-8 assumed) and stores its length in *len.
inline uint32_t decode_utf8(const uint8_t* p, size_t* len) {
  const uint8_t b = p[0];
  if (b < 0x80) {
    *len = 1;
    return b;
  }
  if (b < 0xE0) {
    *len = 2;
    return (uint32_t(b & 0x1F) << 6) | (p[1] & 0x3F);
  }
  if (b < 0xF0) {
    *len = 3;
    return (uint32_t(b & 0x0F) << 12) | (uint32_t(p[1] & 0x3F) << 6) | (p[2] & 0x3F);
  }
  *len = 4;
  return (uint32_t(b & 0x07) << 18) | (uint32_t(p[1] & 0x3F) << 12) | (uint32_t(p[2] & 0x3F) << 6) | (p[3] & 0x3F);
}

int32_t count_chars(const uint8_t* p, size_t n) {
  int32_t chars = 0;
  for (size_t i = 0; i < n; ++i) chars += (p[i] & 0xC0) != 0x80;
  return chars;
}

int32_t require_token(const Vocab& vocab, const std::string& token, const char* role) {
  const int32_t id = vocab.token_to_id(token);
  if (id < 0) throw VocabError(std::string("the vocabulary has no ") + role + " token '" + token + "'");
  return id;
}

}  // namespace

Tokenizer::Tokenizer(Vocab vocab, bool lowercase, const std::vector<std::string>& special_tokens,
                     const std::string& unk, const std::string& cls, const std::string& sep, int32_t max_chars_per_word,
                     const std::string& marker)
    : vocab_(std::move(vocab)), lowercase_(lowercase) {
  const int32_t unk_id = require_token(vocab_, unk, "unknown");
  cls_id_ = require_token(vocab_, cls, "classifier");
  sep_id_ = require_token(vocab_, sep, "separator");
  for (const auto& token : special_tokens) {
    specials_.emplace_back(token, require_token(vocab_, token, "special"));
    special_first_byte_[static_cast<uint8_t>(token[0])] = true;
  }
  std::stable_sort(specials_.begin(), specials_.end(),
                   [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
  trie_ = std::make_unique<Trie>(vocab_, marker, unk_id, max_chars_per_word);
  for (uint32_t c = 0; c < 128; ++c) {
    ascii_flags_[c] = char_flags(c);
    ascii_mapped_[c] = static_cast<char>(c);
    const uint16_t entry = lowercase_ ? uncased_entry(c) : 0;
    if (entry != 0) {
      const uint32_t packed = unicode::kMapEntries[entry];
      const uint8_t mapped = unicode::kMapPool[packed >> 8];
      // The fast path assumes ASCII maps to one ASCII character of the same class, as in every Unicode version.
      if ((packed & 255u) != 1 || mapped >= 128 || char_flags(mapped) != ascii_flags_[c]) {
        throw std::logic_error("unicode_tables.inc maps ASCII " + std::to_string(c) + " unexpectedly");
      }
      ascii_mapped_[c] = static_cast<char>(mapped);
    }
  }
}

int32_t Tokenizer::match_special(const uint8_t* p, size_t n, size_t* len) const {
  for (const auto& [token, id] : specials_) {
    if (token.size() <= n && std::equal(token.begin(), token.end(), reinterpret_cast<const char*>(p))) {
      *len = token.size();
      return id;
    }
  }
  return -1;
}

// One pass over the text: special tokens are cut out of the raw text first (as HF's added-token splitting does),
// then each character is cleaned, CJK-isolated, mapped (uncased) and split on whitespace and punctuation. Words go
// to on_word(bytes, origins) where origins[k] is the source character of byte k (filled when with_origins).
template <typename WordSink, typename SpecialSink>
void Tokenizer::walk(std::string_view text, bool with_origins, WordSink&& on_word, SpecialSink&& on_special) const {
  const auto* p = reinterpret_cast<const uint8_t*>(text.data());
  const size_t n = text.size();
  thread_local std::string scratch_word;  // reused across calls on a thread: no allocation per text
  thread_local std::vector<int32_t> scratch_origins;
  std::string& word = scratch_word;  // plain references, so the lambdas below skip the TLS lookup
  std::vector<int32_t>& origins = scratch_origins;
  word.clear();
  origins.clear();
  auto flush = [&] {
    if (!word.empty()) {
      on_word(word, origins);
      word.clear();
      origins.clear();
    }
  };
  auto visit = [&](uint32_t cp, const uint8_t* bytes, size_t len, int32_t origin) {
    const bool punct = char_flags(cp) & unicode::kPunct;
    if (punct) flush();
    word.append(reinterpret_cast<const char*>(bytes), len);
    if (with_origins) origins.insert(origins.end(), len, origin);
    if (punct) flush();
  };
  size_t i = 0;
  int32_t ci = 0;
  while (i < n) {
    if (special_first_byte_[p[i]]) {
      size_t len;
      const int32_t id = match_special(p + i, n - i, &len);
      if (id >= 0) {
        flush();
        const int32_t chars = count_chars(p + i, len);
        on_special(id, ci, ci + chars);
        i += len;
        ci += chars;
        continue;
      }
    }
    if (p[i] < 0x80) {
      const uint8_t flags = ascii_flags_[p[i]];
      if (flags & unicode::kSpace) {
        flush();
      } else if (flags & unicode::kPunct) {
        flush();
        word.push_back(static_cast<char>(p[i]));
        if (with_origins) origins.push_back(ci);
        flush();
      } else if (!(flags & unicode::kRemove)) {
        word.push_back(ascii_mapped_[p[i]]);
        if (with_origins) origins.push_back(ci);
      }
      ++i;
      ++ci;
      continue;
    }
    size_t len;
    const uint32_t cp = decode_utf8(p + i, &len);  // before the call: it sets len
    walk_non_ascii(cp, p + i, len, ci, flush, visit);
    i += len;
    ++ci;
  }
  flush();
}

// One non-ASCII character, source character `origin`, of walk's pass: whitespace ends the word, control characters
// are dropped, CJK characters are words of their own, and (uncased) the character's mapping goes to visit.
template <typename Flush, typename Visit>
inline void Tokenizer::walk_non_ascii(uint32_t cp, const uint8_t* bytes, size_t len, int32_t origin, Flush& flush,
                                      Visit& visit) const {
  const uint8_t flags = char_flags(cp);
  if (flags & unicode::kSpace) {
    flush();
    return;
  }
  if (flags & unicode::kRemove) return;
  const bool cjk = flags & unicode::kCjk;
  if (cjk) flush();
  const uint16_t entry = lowercase_ ? uncased_entry(cp) : 0;
  if (entry == 0) {
    visit(cp, bytes, len, origin);
  } else {
    const uint32_t packed = unicode::kMapEntries[entry];
    const uint8_t* m = unicode::kMapPool + (packed >> 8);
    const uint8_t* end = m + (packed & 255u);
    while (m < end) {
      size_t mlen;
      const uint32_t mcp = decode_utf8(m, &mlen);
      visit(mcp, m, mlen, origin);
      m += mlen;
    }
  }
  if (cjk) flush();
}

void Tokenizer::encode(std::string_view text, Encoding& out, bool with_offsets) const {
  const TrieView& view = trie_->view();
  thread_local std::vector<int32_t> scratch_ends;
  std::vector<int32_t>& ends = scratch_ends;
  auto on_word = [&](const std::string& word, const std::vector<int32_t>& origins) {
    const size_t base = out.ids.size();
    out.ids.resize(base + word.size());
    if (with_offsets) ends.resize(word.size());
    const int32_t count = match_word(view, reinterpret_cast<const uint8_t*>(word.data()),
                                     static_cast<int32_t>(word.size()), out.ids.data() + base,
                                     with_offsets ? ends.data() : nullptr, nullptr);
    out.ids.resize(base + count);
    if (with_offsets) {
      int32_t start = 0;
      for (int32_t k = 0; k < count; ++k) {
        out.offsets.push_back(origins[start]);
        out.offsets.push_back(origins[ends[k] - 1] + 1);
        start = ends[k];
      }
    }
  };
  auto on_special = [&](int32_t id, int32_t begin, int32_t end) {
    out.ids.push_back(id);
    if (with_offsets) {
      out.offsets.push_back(begin);
      out.offsets.push_back(end);
    }
  };
  walk(text, with_offsets, on_word, on_special);
}

void Tokenizer::split_words(std::string_view text, std::string& bytes, std::vector<int64_t>& word_ends,
                            std::vector<int32_t>& special_ids) const {
  auto on_word = [&](const std::string& word, const std::vector<int32_t>&) {
    bytes += word;
    word_ends.push_back(static_cast<int64_t>(bytes.size()));
    special_ids.push_back(-1);
  };
  auto on_special = [&](int32_t id, int32_t, int32_t) {
    bytes += vocab_.id_to_token(id);
    word_ends.push_back(static_cast<int64_t>(bytes.size()));
    special_ids.push_back(id);
  };
  walk(text, false, on_word, on_special);
}

void Tokenizer::encode_ids(std::string_view text, const std::string_view* pair, bool add_special_tokens,
                           std::vector<int32_t>& ids) const {
  Encoding enc;
  enc.ids.swap(ids);
  if (add_special_tokens) enc.ids.push_back(cls_id_);
  encode(text, enc, false);
  if (add_special_tokens) enc.ids.push_back(sep_id_);
  if (pair != nullptr) {
    encode(*pair, enc, false);
    if (add_special_tokens) enc.ids.push_back(sep_id_);
  }
  ids.swap(enc.ids);
}

}  // namespace fastbert
