// WordPiece vocabulary: the token <-> id tables read from a BERT vocab.txt.
//
// One token per line, the id is the 0-based line number. The loader validates what BERT's own reader silently
// accepts: invalid UTF-8, empty lines, tokens with surrounding whitespace, duplicated tokens and a missing final
// token are reported as errors naming the file and the 1-based line. The tokenizer (matcher, normalizer) builds
// on this class; it owns no matching logic itself.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace fastbert {

class VocabError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Returns the byte offset of the first invalid UTF-8 sequence in `s`, or std::string_view::npos if `s` is valid.
// Overlong encodings, surrogates (U+D800..U+DFFF) and code points above U+10FFFF are invalid.
size_t find_invalid_utf8(std::string_view s);

class Vocab {
 public:
  // Parses vocab.txt contents; `source` names the file in error messages.
  static Vocab from_text(std::string_view text, const std::string& source);
  static Vocab from_file(const std::string& path);

  Vocab() = default;
  // ids_ holds views into tokens_: a copy must index its own strings (a moved vector keeps its elements in place).
  Vocab(const Vocab& other);
  Vocab& operator=(const Vocab& other);
  Vocab(Vocab&&) noexcept = default;
  Vocab& operator=(Vocab&&) noexcept = default;

  int32_t size() const { return static_cast<int32_t>(tokens_.size()); }
  // Returns -1 when the token is not in the vocabulary.
  int32_t token_to_id(std::string_view token) const;
  const std::string& id_to_token(int32_t id) const;
  const std::vector<std::string>& tokens() const { return tokens_; }

 private:
  std::vector<std::string> tokens_;
  void index();  // fills ids_ from tokens_ (no duplicate check: callers checked on load)

  std::unordered_map<std::string_view, int32_t> ids_;  // views into tokens_, which never reallocates after load
};

}  // namespace fastbert
